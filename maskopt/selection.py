"""Selection rules shared by every path: how many entries, and which.

The PyTorch path batches the exact top-k over all blocks of equal length, so a model's
hundreds of tensors cost one ``kthvalue`` call per distinct block length, not one
``torch.topk`` per tensor.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

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
    """Entries updated in a block of ``n``: ``min(n, max(1, floor(alpha*n + 0.5)))`` (0 if n == 0)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must satisfy 0 < alpha <= 1, got {alpha!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    if n == 0:
        return 0
    return min(n, max(1, math.floor(alpha * n + 0.5)))


def _topk_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries in each row; ties go to the lowest index."""
    rows, length = scores.shape
    if k >= length:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(length - k + 1, dim=1, keepdim=True).values
    above = scores > kth
    at = scores == kth
    still_needed = k - above.sum(dim=1, keepdim=True)
    # The first `still_needed` entries equal to the k-th value, in index order.
    return above | (at & (at.cumsum(dim=1) <= still_needed))


def topk_masks(
    scores: Sequence[torch.Tensor], alpha: float, block_size: int | None = None
) -> list[torch.Tensor]:
    """Exact top-k masks of each tensor in ``scores`` (per block of ``block_size`` flat entries).

    ``k = topk_count(block_length, alpha)`` per block; exactly ``k`` entries are selected and
    ties at the k-th value go to the lowest flat index. Blocks of equal length across all
    tensors are selected in one batched call.
    """
    by_length: dict[int, list[tuple[int, int, torch.Tensor]]] = defaultdict(list)
    pieces: list[list[torch.Tensor | None]] = []
    for t, s in enumerate(scores):
        flat = s.reshape(-1)
        n = flat.numel()
        block = n if block_size is None else min(block_size, n)
        parts: list[torch.Tensor | None] = []
        if n:
            full = n // block
            if full:
                by_length[block].append((t, len(parts), flat[: full * block].view(full, block)))
                parts.append(None)
            tail = n - full * block
            if tail:
                by_length[tail].append((t, len(parts), flat[full * block :].view(1, tail)))
                parts.append(None)
        pieces.append(parts)

    for length, members in by_length.items():
        rows = [m[2] for m in members]
        stacked = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
        selected = _topk_rows(stacked, topk_count(length, alpha))
        for (t, slot, _), chunk in zip(members, selected.split([r.shape[0] for r in rows])):
            pieces[t][slot] = chunk.reshape(-1)

    masks = []
    for s, parts in zip(scores, pieces):
        if not parts:
            masks.append(torch.zeros(s.shape, dtype=torch.bool, device=s.device))
        elif len(parts) == 1:
            masks.append(parts[0].view(s.shape))
        else:
            masks.append(torch.cat(parts).view(s.shape))
    return masks


def random_masks(
    shapes: Sequence[torch.Size],
    keys: Sequence[int],
    alpha: float,
    *,
    exact: bool = False,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """RandomBCD masks from the counter hash: ``u(i) < threshold(alpha)``, or (``exact``) the
    ``topk_count(n, alpha)`` entries with the largest ``u(i)``. ``keys[t]`` is
    ``_hash.stream_key(seed, tensor_index, counter)`` of tensor ``t``."""
    hashes = [_hash.hash_keys(math.prod(shape), key, device).view(shape) for shape, key in zip(shapes, keys)]
    if exact:
        return topk_masks(hashes, alpha)
    limit = _hash.threshold(alpha)
    return [u < limit for u in hashes]
