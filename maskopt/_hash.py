"""Counter-based hash behind RandomBCD's masks (and HalfAdam's ``strategy="parameter"``).

A mask entry is a pure function of (seed, tensor index, counter, flat index), so it is
reproducible after a checkpoint/resume, costs no stored mask, and the Triton kernels can
regenerate it in-register. The definition below is the contract every path implements:

    mix32(x)      = lowbias32: x ^= x>>16; x *= 0x7FEB352D; x ^= x>>15; x *= 0x846CA68B; x ^= x>>16
                    (all arithmetic modulo 2**32)
    stream_key    = mix32(mix32(mix32(fold(seed) ^ 0x243F6A88) ^ tensor_index ^ 0x85A308D3)
                          ^ counter ^ 0x13198A2E)          (counter = step, or HFT round)
    u(i)          = mix32((lo32(i) * 0x9E3779B9 + stream_key) mod 2**32) ^ mix32(hi32(i))
    selected(i)   = u(i) < threshold(alpha),   threshold(alpha) = round(alpha * 2**32)

For tensors below 2**32 entries ``u`` is a bijection of the flat index, so the keys are
distinct and ``exact=True`` (the k largest keys) never meets a tie.
"""

from __future__ import annotations

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
GOLDEN32 = 0x9E3779B9
_SALT_SEED = 0x243F6A88
_SALT_TENSOR = 0x85A308D3
_SALT_COUNTER = 0x13198A2E


def mix32_int(x: int) -> int:
    """lowbias32 on a Python int (modulo 2**32).

    Args:
        x: any Python int; only its low 32 bits are used.

    Returns:
        The mixed value, an int in [0, 2**32).
    """
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def fold_seed(seed: int) -> int:
    """A seed folded to 32 bits: the XOR of the high and low halves of its 64 bits.

    Args:
        seed: any int (or int-convertible value); taken modulo 2**64, so negative seeds are
            their two's-complement bits.

    Returns:
        An int in [0, 2**32).
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return (seed ^ (seed >> 32)) & MASK32


def tensor_key(seed: int, tensor_index: int) -> int:
    """The per-tensor part of :func:`stream_key` (the kernels and telemetry add the counter
    on the device).

    Args:
        seed: the optimizer's hash seed (any int; folded with :func:`fold_seed`).
        tensor_index: the tensor's index in its optimizer (low 32 bits used).

    Returns:
        An int in [0, 2**32).
    """
    k = mix32_int(fold_seed(seed) ^ _SALT_SEED)
    return mix32_int(k ^ (int(tensor_index) & MASK32) ^ _SALT_TENSOR)


def stream_key(seed: int, tensor_index: int, counter: int) -> int:
    """The per-(tensor, step) key; a Python int in [0, 2**32).

    Args:
        seed: the optimizer's hash seed (any int; folded with :func:`fold_seed`).
        tensor_index: the tensor's index in its optimizer (low 32 bits used).
        counter: the step counter, or HalfAdam's round (low 32 bits used).
    """
    return mix32_int(tensor_key(seed, tensor_index) ^ (int(counter) & MASK32) ^ _SALT_COUNTER)


def stream_key_tensor(seed: int, tensor_index: int, counter: torch.Tensor) -> torch.Tensor:
    """:func:`stream_key` with the counter a (float or int) tensor, as int32 bits on its device:
    the fused path keeps step counters on the GPU, and this keys a mask without reading them.

    Args:
        seed: the optimizer's hash seed (any int; folded with :func:`fold_seed`).
        tensor_index: the tensor's index in its optimizer (low 32 bits used).
        counter: the step counter as a tensor of any shape (usually 0-d), float or integer;
            a float value is truncated to an integer, then its low 32 bits are used. It is
            not modified.

    Returns:
        An int32 tensor of ``counter``'s shape on its device, holding the bits of
        :func:`stream_key` ``(seed, tensor_index, counter)``.
    """
    c = counter.detach().to(torch.int64).bitwise_and_(MASK32)
    return mix32(int32_bits(c.bitwise_xor_(tensor_key(seed, tensor_index) ^ _SALT_COUNTER)))


def threshold(alpha: float) -> int:
    """Keys below this are selected; alpha=1 gives 2**32, so every entry is.

    Args:
        alpha: the selection probability, ``0 <= alpha <= 1`` (values outside are clamped).

    Returns:
        ``round(alpha * 2**32)`` as an int in [0, 2**32], compared with ``u(i)`` (the values
        of :func:`hash_keys`).
    """
    return min(1 << 32, max(0, int(round(float(alpha) * 4294967296.0))))


def _signed32(c: int) -> int:
    return c - (1 << 32) if c >= 1 << 31 else c


def int32_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as an int32 tensor with the same 32 bits.

    Args:
        x: an int64 tensor with values in [0, 2**32); not modified.

    Returns:
        A new int32 tensor of ``x``'s shape and device (values >= 2**31 become negative).
    """
    return (x - (1 << 31)).to(torch.int32).bitwise_xor_(_signed32(1 << 31))


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 values (torch's >> on int32 is arithmetic)."""
    return (x >> s) & ((1 << (32 - s)) - 1)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 elementwise, in place on an int32 tensor (bit pattern of the uint32 value).

    int32 multiplication wraps modulo 2**32 on every torch backend, which is exactly the
    uint32 arithmetic of the definition; only the right shifts need masking.

    Args:
        x: an int32 tensor holding uint32 bit patterns (see :func:`int32_bits`); it is
            overwritten with the result.

    Returns:
        ``x`` itself.
    """
    x.bitwise_xor_(_srl(x, 16))
    x.mul_(_signed32(_M1))
    x.bitwise_xor_(_srl(x, 15))
    x.mul_(_signed32(_M2))
    return x.bitwise_xor_(_srl(x, 16))


def order_keys(numel: int, key: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """Order-preserving keys ``u(i) - 2**31`` for flat indices ``start..start+numel-1`` as int32.

    Subtracting 2**31 (flipping the top bit) makes signed int32 order equal the unsigned
    order of ``u``, so ``order_keys(...) < signed_threshold(alpha)`` is ``u < threshold`` and
    top-k over these keys is top-k over ``u``. Half the bytes of :func:`hash_keys`.

    Args:
        numel: how many consecutive flat indices to key.
        key: the tensor's :func:`stream_key`, an int in [0, 2**32).
        device: where the keys are made (default ``"cpu"``).
        start: the first flat index (default 0); a shard of a larger tensor passes its global
            offset so that its keys are those of the whole tensor.

    Returns:
        A 1-D int32 tensor of ``numel`` keys on ``device``.
    """
    # Under torch.compile the torch version (identical keys) is traced: Dynamo would turn the
    # NumPy one into uint32 torch ops that have no CPU kernels.
    if (
        torch.device(device).type == "cpu"
        and start + numel <= (1 << 32)
        and not torch.compiler.is_compiling()
    ):
        return torch.from_numpy(_order_keys_numpy(numel, key, start))
    return _order_keys_torch(numel, key, device, start)


def _order_keys_torch(
    numel: int, key: int | torch.Tensor, device: torch.device | str, start: int
) -> torch.Tensor:
    """:func:`order_keys` in torch ops. ``key``: a Python int in [0, 2**32), or its 32 bits as
    a 0-d int32 tensor (a key computed on the device from a device step counter)."""
    if start + numel <= (1 << 31):
        idx = torch.arange(start, start + numel, dtype=torch.int32, device=device)
        key32 = key if torch.is_tensor(key) else _signed32(key)
        u = mix32(idx.mul_(_signed32(GOLDEN32)).add_(key32))
    else:  # beyond int32 indexing: the same function computed in int64
        idx = torch.arange(start, start + numel, dtype=torch.int64, device=device)
        key64 = key.to(torch.int64).bitwise_and_(MASK32) if torch.is_tensor(key) else key
        lo = ((idx & MASK32) * GOLDEN32 + key64) & MASK32
        u = mix32(int32_bits(lo))
        u.bitwise_xor_(mix32((idx >> 32).to(torch.int32)))
    return u.bitwise_xor_(_signed32(1 << 31))


def _order_keys_numpy(numel: int, key: int, start: int) -> np.ndarray:
    # NumPy has wrapping uint32 arithmetic and logical shifts: the definition verbatim, and
    # about twice as fast on CPU as the int32 emulation in torch.
    x = np.arange(start, start + numel, dtype=np.uint32)
    x *= np.uint32(GOLDEN32)
    x += np.uint32(key)
    x ^= x >> np.uint32(16)
    x *= np.uint32(_M1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(_M2)
    x ^= x >> np.uint32(16)
    x ^= np.uint32(1 << 31)
    return x.view(np.int32)


def signed_threshold(alpha: float) -> int:
    """``threshold(alpha) - 2**31``: compare with :func:`order_keys` (selected iff key < it).

    Args:
        alpha: the selection probability, ``0 <= alpha <= 1``.

    Returns:
        An int in [-2**31, 2**31]; alpha=1 gives 2**31, outside int32's range, so callers
        treat that case (every entry selected) before comparing with an int32 tensor.
    """
    return threshold(alpha) - (1 << 31)


def hash_keys(numel: int, key: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """``u(i)`` itself for flat indices ``start..start+numel-1``, as int64 values in [0, 2**32).

    Args:
        numel: how many consecutive flat indices to key.
        key: the tensor's :func:`stream_key`, an int in [0, 2**32).
        device: where the keys are made (default ``"cpu"``).
        start: the first flat index (default 0); a shard passes its global offset.

    Returns:
        A 1-D int64 tensor of ``numel`` values on ``device``; compare with :func:`threshold`.
    """
    return order_keys(numel, key, device, start).to(torch.int64) + (1 << 31)
