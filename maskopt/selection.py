"""Selection rules shared by every path: how many entries, and which.

The PyTorch path works with the sorted flat indices of the selected entries, so the masked
update touches only those entries. Short blocks of equal length are selected together in
one batched ``kthvalue`` call (a model's hundreds of small tensors are not a Python loop of
``torch.topk``); long ones find their k-th value from a bracket drawn from a sample, which
costs two passes instead of a full quickselect.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import _hash

# The selection kinds every path (PyTorch, Triton) understands.
ALL = "all"
TOPK_MOMENTUM = "topk_momentum"
TOPK_GRADIENT = "topk_gradient"
RANDOM = "random"
RANDOM_EXACT = "random_exact"
KINDS = (ALL, TOPK_MOMENTUM, TOPK_GRADIENT, RANDOM, RANDOM_EXACT)


def topk_count(n: int, alpha: float) -> int:
    """Entries updated in a block of ``n``: ``min(n, max(1, floor(alpha*n + 0.5)))`` (0 if n == 0).

    Args:
        n: the block's (or tensor's) number of entries, ``n >= 0``.
        alpha: fraction of entries to update, ``0 < alpha <= 1``.

    Raises:
        ValueError: ``alpha`` or ``n`` out of range.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must satisfy 0 < alpha <= 1, got {alpha!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    if n == 0:
        return 0
    return min(n, max(1, math.floor(alpha * n + 0.5)))


# Keys of non-negative scores: IEEE bit patterns order like the values, and every NaN maps to
# the one key just above +inf, so NaN ranks as the largest score (as torch.topk ranks it) and
# NaNs tie among themselves, which the lowest-index rule then orders. The Triton kernels
# (kernels/_common.py abs_key) and the sharded path use the same keys.
NAN_KEY32 = 0x7F800001
NAN_KEY64 = 0x7FF0000000000001


def magnitude_keys(magnitudes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Integer keys with the order of ``|x|`` values (already non-negative or NaN), NaN above
    +inf. float32 and narrower give int32 keys, float64 int64 keys. The inputs are reused
    in place when they are contiguous float32/float64 tensors.

    Args:
        magnitudes: floating tensors of non-negative values or NaN (such as ``|exp_avg|``);
            a negative value (sign bit set) would get a negative key and rank below every
            other. A contiguous float32/float64 tensor is viewed, not copied: its NaNs are
            rewritten to the one NaN bit pattern ``NAN_KEY32``/``NAN_KEY64`` (still NaN).

    Returns:
        Per input, an int32 or int64 tensor of its shape whose values order like the inputs.
    """
    keys: list[torch.Tensor] = []
    for m in magnitudes:
        if m.dtype == torch.float64:
            keys.append(m.contiguous().view(torch.int64))
        else:
            keys.append(m.float().contiguous().view(torch.int32))
    for key_dtype, nan_key in ((torch.int32, NAN_KEY32), (torch.int64, NAN_KEY64)):
        same = [k for k in keys if k.dtype == key_dtype]
        if same:
            torch._foreach_clamp_max_(same, nan_key)
    return keys


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Signed float scores -> integer keys with the same order (-0.0 equal to +0.0), NaN
    largest; integer scores are returned as they are."""
    if not scores.is_floating_point():
        return scores
    wide = scores.dtype == torch.float64
    x = (scores.double() if wide else scores.float()) + 0.0  # + 0.0 turns -0.0 into +0.0
    bits = x.view(torch.int64 if wide else torch.int32)
    flip = (1 << 63) - 1 if wide else (1 << 31) - 1
    keys = torch.where(bits < 0, bits ^ flip, bits)
    return keys.masked_fill_(torch.isnan(x), NAN_KEY64 if wide else NAN_KEY32)


def _kth_largest_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Entries of each row kept by the exact top-k with lowest-index ties, as a bool mask."""
    rows, length = scores.shape
    if k >= length:
        return torch.ones_like(scores, dtype=torch.bool)
    if scores.device.type == "cpu":
        kth = torch.from_numpy(
            np.partition(scores.numpy(), length - k, axis=1)[:, length - k : length - k + 1]
        )
    else:  # CUDA's kthvalue runs one block per row: topk's radix select is far faster there
        kth = scores.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    return _keep_top(scores, kth, k)


def _keep_top(scores: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Entries above the k-th value, plus the first (by index) of those equal to it."""
    at_least = scores >= kth
    if bool((torch.count_nonzero(at_least, dim=-1) == k).all()):
        return at_least  # no surplus ties at the boundary: the common case
    above = scores > kth
    at = at_least & ~above
    still_needed = k - torch.count_nonzero(above, dim=-1).unsqueeze(-1)
    return above | (at & (at.cumsum(dim=-1) <= still_needed))


def nonzero_flat(mask: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices of the True entries (NumPy's flatnonzero on CPU: ~4x torch's).

    Args:
        mask: a bool tensor of any shape, read in row-major (flat) order.

    Returns:
        A 1-D int64 tensor on ``mask``'s device.
    """
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask.reshape(-1)).squeeze(1)


# Rows at least this long are selected one at a time: a random sample gives a value that
# about k + O(sqrt(k)) entries exceed; one pass gathers those candidates and an exact
# selection among them finishes. A full quickselect over the row would cost about as much
# as several AdamW steps. On CPU the passes run in NumPy, several times faster than torch's
# CPU kthvalue/nonzero.
_LONG_ROW = 1 << 16
_SAMPLE_SEED = 0x5EED
_samples_cache: dict[int, np.ndarray] = {}


def _sample_positions(n: int) -> np.ndarray:
    """Fixed pseudo-random positions to sample in a row of length n (cached per length)."""
    if n not in _samples_cache:
        if len(_samples_cache) > 256:
            _samples_cache.clear()
        count = min(1 << 16, n // 4)
        _samples_cache[n] = np.random.default_rng(_SAMPLE_SEED).integers(0, n, count)
    return _samples_cache[n]


def _top_k_long_numpy(a: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the exact top-k of 1-D ``a`` (lowest index wins ties)."""
    n = a.size
    if k >= n:
        return np.arange(n)
    drawn = a.take(_sample_positions(n))
    samples = drawn.size
    # The sample only speeds up the search; the result is exact whatever it draws.
    expected_rank = k * samples / n
    rank = math.ceil(expected_rank + 4.0 * math.sqrt(expected_rank * (1 - k / n)) + 8)
    candidates = None
    if rank < samples:
        lower = np.partition(drawn, samples - rank)[samples - rank]  # the rank-th largest drawn
        candidates = np.flatnonzero(a >= lower)
        if candidates.size < k:  # an unlucky sample; fall back to the whole row
            candidates = None
    if candidates is None:
        candidates = np.arange(n)
    values = a.take(candidates)
    surplus = candidates.size - k
    if surplus == 0:
        return candidates
    kth = np.partition(values, surplus)[surplus]  # the k-th largest of all
    keep = values >= kth
    if np.count_nonzero(keep) != k:  # surplus ties at the k-th value: lowest indices win
        above = values > kth
        at = keep & ~above
        keep = above | (at & (np.cumsum(at) <= k - np.count_nonzero(above)))
    return candidates[keep]


def _top_k_long(a: torch.Tensor, k: int) -> torch.Tensor:
    if a.device.type == "cpu":
        return torch.from_numpy(_top_k_long_numpy(a.numpy(), k))
    n = a.numel()
    if k >= n:
        return torch.arange(n, device=a.device)
    # On an H100, kthvalue on one 65M-entry row took seconds (one thread block per row);
    # topk's multi-block radix select takes milliseconds.
    kth = a.topk(k, sorted=False).values.amin()
    return nonzero_flat(_keep_top(a, kth, k))


_pool: ThreadPoolExecutor | None = None


def _map_rows(fn, jobs: list) -> list:
    """``map(fn, jobs)``, spread over torch's intra-op thread count when rows are on the CPU:
    NumPy's partition and flatnonzero are single-threaded but release the GIL."""
    global _pool
    workers = torch.get_num_threads()
    if workers < 2 or len(jobs) < 2 or jobs[0][3].device.type != "cpu":
        return [fn(job) for job in jobs]
    if _pool is None or _pool._max_workers != workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="maskopt-select")
    return list(_pool.map(fn, jobs))


def topk_indices(
    scores: Sequence[torch.Tensor], alpha: float, block_size: int | None = None
) -> list[torch.Tensor]:
    """Sorted flat indices of the exact top-k of each tensor (per block of ``block_size``).

    ``k = topk_count(block_length, alpha)`` per block; exactly ``k`` entries are selected and
    ties at the k-th value go to the lowest flat index. NaN ranks as the largest score.

    Args:
        scores: one tensor per selection, any shape (read flat); floating or integer.
        alpha: fraction of each block to select, ``0 < alpha <= 1``.
        block_size: select per chunk of this many consecutive flat entries (the last chunk
            may be shorter); None selects over the whole tensor.
    """
    scores = [_order_keys(s) for s in scores]
    by_length: dict[int, list[tuple[int, int, int, torch.Tensor]]] = defaultdict(list)
    pieces: list[list[torch.Tensor | None]] = []
    for t, s in enumerate(scores):
        flat = s.reshape(-1)
        n = flat.numel()
        block = n if block_size is None else min(block_size, n)
        parts: list[torch.Tensor | None] = []
        if n:
            full = n // block
            for start, length, rows in ((0, block, full), (full * block, n - full * block, 1)):
                if rows and length:
                    by_length[length].append(
                        (t, len(parts), start, flat[start : start + rows * length].view(rows, length))
                    )
                    parts.append(None)
        pieces.append(parts)

    for length, members in by_length.items():
        k = topk_count(length, alpha)
        if length >= _LONG_ROW:
            jobs = [
                (t, slot, start + r * length, row)
                for t, slot, start, rows in members
                for r, row in enumerate(rows)
            ]
            found = _map_rows(lambda job, k=k: _top_k_long(job[3], k) + job[2], jobs)
            for (t, slot, _, _), idx in zip(jobs, found, strict=True):
                before = pieces[t][slot]
                pieces[t][slot] = idx if before is None else torch.cat([before, idx])
            continue
        stacked = torch.cat([m[3] for m in members]) if len(members) > 1 else members[0][3]
        keep = _kth_largest_rows(stacked, k)
        chunks = keep.split([m[3].shape[0] for m in members])
        for (t, slot, start, _), chunk in zip(members, chunks, strict=True):
            pieces[t][slot] = nonzero_flat(chunk.reshape(-1)) + start

    empty = torch.zeros(0, dtype=torch.long)
    indices = []
    for s, parts in zip(scores, pieces, strict=True):
        filled = [p for p in parts if p is not None]
        assert len(filled) == len(parts)  # every slot was given its indices above
        indices.append(
            (torch.cat(filled) if len(filled) > 1 else filled[0]) if filled else empty.to(s.device)
        )
    return indices


def indices_to_masks(indices: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Boolean masks, True at the given flat indices.

    Args:
        indices: per tensor, flat indices (an int64 tensor) of the entries to set.
        like: per tensor, a tensor giving the mask's shape and device.

    Returns:
        Per tensor, a new bool tensor of ``like``'s shape and device.
    """
    masks = []
    for idx, t in zip(indices, like, strict=True):
        mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        mask[idx] = True
        masks.append(mask.view(t.shape))
    return masks


def topk_masks(
    scores: Sequence[torch.Tensor], alpha: float, block_size: int | None = None
) -> list[torch.Tensor]:
    """Boolean masks of :func:`topk_indices` (same shapes as ``scores``).

    Args:
        scores: one tensor per selection, any shape (read flat); floating or integer.
        alpha: fraction of each block to select, ``0 < alpha <= 1``.
        block_size: select per chunk of this many consecutive flat entries (the last chunk
            may be shorter); None (default) selects over the whole tensor.
    """
    return indices_to_masks(topk_indices(scores, alpha, block_size), scores)


def random_indices(
    shapes: Sequence[Sequence[int]],
    keys: Sequence[int],
    alpha: float,
    *,
    exact: bool = False,
    device: torch.device | str = "cpu",
    starts: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """RandomBCD's selection from the counter hash, as sorted flat indices: ``u(i) <
    threshold(alpha)``, or (``exact``) the ``topk_count(n, alpha)`` entries with the largest
    ``u(i)``. ``keys[t]`` is ``_hash.stream_key(seed, tensor_index, counter)`` of tensor ``t``.
    ``starts[t]`` (default 0) is the flat index of the tensor's first entry in a larger
    tensor it is a shard of: the hash is taken on those global indices.

    Args:
        shapes: per tensor, its shape (only the entry count matters).
        keys: per tensor, its :func:`maskopt._hash.stream_key` for this step.
        alpha: the selection probability (``exact=False``) or fraction (``exact=True``),
            ``0 < alpha <= 1``.
        exact: False (default): the Bernoulli mask ``u(i) < threshold(alpha)``; True: the
            ``topk_count(n, alpha)`` entries with the largest ``u(i)``. Keyword-only.
        device: where the keys are made and the indices returned (default ``"cpu"``).
        starts: per tensor, the global flat index of its first entry, or None (default) for
            all zeros. With ``exact=True`` the top-k is still taken over the given entries
            only (a sharded tensor's exact selection is
            :func:`maskopt.distributed.random_indices_sharded`).

    Returns:
        Per tensor, the sorted flat indices (int64) of its selected entries, counted from its
        own first entry (not from ``starts[t]``).
    """
    starts = starts if starts is not None else [0] * len(shapes)
    keyed = [
        _hash.order_keys(math.prod(shape), key, device, start=start)
        for shape, key, start in zip(shapes, keys, starts, strict=True)
    ]
    if exact:
        return topk_indices(keyed, alpha)
    limit = _hash.signed_threshold(alpha)
    if limit >= 1 << 31:  # alpha == 1: every key qualifies (and the limit overflows int32)
        return [torch.arange(u.numel(), device=u.device) for u in keyed]
    return [nonzero_flat(u < limit) for u in keyed]


def random_masks(
    shapes: Sequence[torch.Size],
    keys: Sequence[int],
    alpha: float,
    *,
    exact: bool = False,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Boolean masks of :func:`random_indices`.

    Args:
        shapes: per tensor, its shape (the masks take it).
        keys: per tensor, its :func:`maskopt._hash.stream_key` for this step.
        alpha: the selection probability (``exact=False``) or fraction (``exact=True``),
            ``0 < alpha <= 1``.
        exact: False (default): the Bernoulli mask; True: the ``topk_count(n, alpha)``
            entries with the largest ``u(i)``. Keyword-only.
        device: where the masks are made (default ``"cpu"``).

    Returns:
        Per tensor, a bool tensor of its shape on ``device``.
    """
    like = [torch.empty(shape, device=device, dtype=torch.bool) for shape in shapes]
    return indices_to_masks(random_indices(shapes, keys, alpha, exact=exact, device=device), like)
