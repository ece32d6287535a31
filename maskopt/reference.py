"""The executable specification: one tensor at a time, written straight from the papers.

MoFO (Algorithm 1 of the MoFO paper), its gradient-filtered and randomized BCD ablations,
and the dense AdamW step that HalfAdam applies to its active tensors. Everything here is
deliberately plain (a stable sort for top-k, NumPy for the hash) so that it shares as
little code as possible with the fast paths it is the oracle for. It computes in float64
by default.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _hash
from .selection import ALL, RANDOM, RANDOM_EXACT, TOPK_GRADIENT, TOPK_MOMENTUM

_U64 = np.uint64
_M32 = _U64(0xFFFFFFFF)


def _mix32_np(x: np.ndarray) -> np.ndarray:
    x = x & _M32
    x ^= x >> _U64(16)
    x = (x * _U64(0x7FEB352D)) & _M32
    x ^= x >> _U64(15)
    x = (x * _U64(0x846CA68B)) & _M32
    x ^= x >> _U64(16)
    return x


def hash_u32(numel: int, seed: int, tensor_index: int, counter: int, start: int = 0) -> np.ndarray:
    """u(i) of the counter hash (see maskopt._hash for the definition), in NumPy uint64,
    for flat indices start..start+numel-1.

    Args:
        numel: how many consecutive flat indices to hash.
        seed: the optimizer's hash seed.
        tensor_index: the tensor's index in its optimizer.
        counter: the hash counter (the step, or HalfAdam's round).
        start: the first flat index (default 0).

    Returns:
        A 1-D ``np.uint64`` array of ``numel`` values in [0, 2**32).
    """
    key = _U64(_hash.stream_key(seed, tensor_index, counter))
    idx = np.arange(start, start + numel, dtype=np.uint64)
    u = _mix32_np(((idx & _M32) * _U64(0x9E3779B9) + key) & _M32)
    return u ^ _mix32_np(idx >> _U64(32))


def _top_k_by_sort(score: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k largest; a stable descending sort keeps equal scores in index order."""
    order = torch.sort(score, descending=True, stable=True).indices
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def select(
    selection: str,
    m: torch.Tensor,
    g: torch.Tensor,
    *,
    alpha: float,
    block_size: int | None = None,
    seed: int = 0,
    tensor_index: int = 0,
    counter: int = 0,
) -> torch.Tensor:
    """The flat boolean mask S of one tensor (m: new first moment, g: gradient).

    Args:
        selection: one of ``maskopt.selection.KINDS``: ``"all"``, ``"topk_momentum"``
            (top-k of ``|m|``), ``"topk_gradient"`` (top-k of ``|g|``), ``"random"``
            (``u(i) < threshold(alpha)``) or ``"random_exact"`` (the k largest ``u(i)``).
            Top-k keeps ``k = min(n, max(1, floor(alpha * n + 0.5)))`` entries of a block of
            ``n``, ties to the lowest index.
        m: the first moment after this step's update, any shape (read flat).
        g: the gradient, shape of ``m``.
        alpha: fraction (top-k, ``random_exact``) or probability (``random``) of entries
            selected; keyword-only, required, not checked here.
        block_size: top-k kinds only: select per chunk of this many consecutive flat entries
            (the last may be shorter); None (default) over the whole tensor.
        seed: random kinds: the hash seed (default 0).
        tensor_index: random kinds: the tensor's index in its optimizer (default 0).
        counter: random kinds: the hash counter (default 0).

    Returns:
        A 1-D bool tensor of ``m.numel()`` entries on the CPU.

    Raises:
        ValueError: an unknown ``selection``.
    """
    n = m.numel()
    if selection == ALL:
        return torch.ones(n, dtype=torch.bool)
    if selection == RANDOM:
        u = hash_u32(n, seed, tensor_index, counter)
        return torch.from_numpy(u < _U64(_hash.threshold(alpha))) if n else torch.zeros(0, dtype=torch.bool)
    if selection == RANDOM_EXACT:
        keys = torch.from_numpy(hash_u32(n, seed, tensor_index, counter).astype(np.int64))
        return _top_k_by_sort(keys, min(n, max(1, math.floor(alpha * n + 0.5)))) if n else keys.bool()
    if selection == TOPK_MOMENTUM:
        score = m.reshape(-1).abs()
    elif selection == TOPK_GRADIENT:
        score = g.reshape(-1).abs()
    else:
        raise ValueError(f"unknown selection {selection!r}")
    mask = torch.zeros(n, dtype=torch.bool)
    block = n if block_size is None else block_size
    for start in range(0, n, max(block, 1)):
        chunk = score[start : start + block]
        k = min(chunk.numel(), max(1, math.floor(alpha * chunk.numel() + 0.5)))
        mask[start : start + block] = _top_k_by_sort(chunk, k)
    return mask


def reference_step(
    p: torch.Tensor,
    g: torch.Tensor,
    state: dict,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    selection: str,
    alpha: float = 1.0,
    block_size: int | None = None,
    mask_weight_decay: bool = True,
    seed: int = 0,
    tensor_index: int = 0,
    hash_counter: int | None = None,
    dtype: torch.dtype = torch.float64,
    moment_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One step on one tensor. Updates ``p`` (in its own dtype) and ``state`` in place.

    ``state`` holds ``step`` (int) and ``exp_avg``/``exp_avg_sq`` (created in ``dtype``).
    Returns the boolean mask S (shape of ``p``) of entries that took the Adam update.

    Args:
        p: the parameter, any dtype and device; its selected entries are overwritten (and,
            with ``mask_weight_decay=False``, the others with their decayed value).
        g: its gradient, shape of ``p``.
        state: the tensor's optimizer state, a dict; empty on the first step, then filled
            and updated in place (the moments are kept on the CPU in ``dtype``).
        lr: learning rate.
        beta1, beta2: Adam's moment decay rates.
        eps: added to ``sqrt(v_hat)`` in the denominator.
        weight_decay: decoupled (AdamW) weight decay: an entry is multiplied by
            ``1 - lr * weight_decay``.
        selection: which entries move, as for :func:`select`.
        alpha: fraction or probability of entries selected (default 1.0).
        block_size: top-k kinds only: the block length, or None (default) for the whole
            tensor.
        mask_weight_decay: True (default) decays only the selected entries; False decays
            every entry.
        seed: random kinds: the hash seed (default 0).
        tensor_index: random kinds: the tensor's index in its optimizer (default 0).
        hash_counter: random kinds: the hash counter; None (default) uses the step after
            its increment (a fresh mask each step).
        dtype: the dtype of the moments and of the arithmetic (default float64).
        moment_dtype: the dtype the optimizer stores its moments in, or None (default) for
            ``dtype``: the new moments are rounded to it before the selection and the update
            read them.
    """
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros(p.shape, dtype=dtype)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype)
    state["step"] = t = int(state["step"]) + 1
    g64 = g.detach().to("cpu", dtype)
    m = state["exp_avg"] = beta1 * state["exp_avg"].to(dtype) + (1 - beta1) * g64
    v = state["exp_avg_sq"] = beta2 * state["exp_avg_sq"].to(dtype) + (1 - beta2) * g64 * g64
    if moment_dtype is not None:
        m = state["exp_avg"] = m.to(moment_dtype).to(dtype)
        v = state["exp_avg_sq"] = v.to(moment_dtype).to(dtype)

    counter = t if hash_counter is None else hash_counter
    mask = select(
        selection,
        m,
        g64,
        alpha=alpha,
        block_size=block_size,
        seed=seed,
        tensor_index=tensor_index,
        counter=counter,
    ).view(p.shape)

    theta = p.detach().to("cpu", dtype)
    decayed = theta * (1 - lr * weight_decay)
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    moved = decayed - lr * m_hat / (v_hat.sqrt() + eps)
    untouched = theta if mask_weight_decay else decayed
    result = torch.where(mask, moved, untouched)
    # Only touched entries are written back, so the untouched ones keep their exact bits.
    p.data[mask.to(p.device)] = result[mask].to(p.device, p.dtype)
    if not mask_weight_decay:
        p.data[~mask.to(p.device)] = result[~mask].to(p.device, p.dtype)
    return mask
