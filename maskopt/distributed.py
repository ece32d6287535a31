"""Sharded parameters (FSDP2's DTensors): the selection stays exact over the whole tensor.

FSDP2 (``torch.distributed.fsdp.fully_shard``) gives every rank a contiguous slice of dim 0
of each parameter, so a rank's local entries are a contiguous range of the tensor's global
flat indices. MoFO's top-k must be taken over the whole tensor, not per shard. This module
finds the global k-th largest key with a radix select whose histograms are all-reduced
(256 int64 bins per tensor per pass, four passes; eight for float64), never gathering a tensor:

* keys are non-negative integers that order like the scores: the bits of ``|m|`` (or
  ``|g|``), 31 bits as float32 (63 for float64 parameters); RandomBCD(exact=True)'s hash
  keys, 32 bits;
* after the passes each rank knows the exact k-th key and how many entries equal to it are
  still needed; those go to the lowest global indices (the single-process tie rule): the
  ranks exchange their counts of equal entries and take them in global-offset order.

RandomBCD's Bernoulli mask needs no communication: the hash is computed on global flat
indices, so every shard draws exactly the entries a single process would.

Supported placements: ``Shard(0)`` on one mesh dimension and ``Replicate()`` on any others
(FSDP2, HSDP). Tensor parallelism (``Shard(d)`` with ``d > 0``) makes a rank's entries a
strided set, which this exact selection does not handle: a clear error says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

import torch
import torch.distributed as dist

from . import _hash
from .selection import magnitude_keys, random_indices, topk_count, topk_indices

_PASS_BITS = 8
_BINS = 1 << _PASS_BITS

if TYPE_CHECKING:  # the class, for the annotations; at run time torch may lack it (then None)
    from torch.distributed.tensor import DTensor
else:
    try:  # DTensor is public from torch 2.5 on
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed support
        DTensor = None


@dataclass(frozen=True)
class Shard:
    """Where a rank's local entries sit in the whole tensor.

    The local entries are the contiguous global flat indices ``offset .. offset + n - 1``,
    ``n`` being the local tensor's ``numel()``. Built by :func:`shard_of`.

    Args:
        numel: number of entries of the whole (global) tensor.
        offset: global flat index of the first local entry.
        group: the ``torch.distributed`` process group over which the tensor is sharded
            (the mesh dimension with ``Shard(0)``); the collectives of the selection run on it.
    """

    numel: int  # entries of the whole tensor
    offset: int  # global flat index of the first local entry
    group: dist.ProcessGroup  # process group over which the tensor is sharded


def is_dtensor(t: torch.Tensor) -> TypeGuard[DTensor]:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False where torch has none).

    Args:
        t: any tensor.
    """
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of its storage), or ``t`` itself.

    Args:
        t: a DTensor or a plain tensor.
    """
    return t.to_local() if is_dtensor(t) else t


def shard_of(param: torch.Tensor, who: str = "maskopt") -> Shard | None:
    """The :class:`Shard` of a DTensor parameter, or None when every rank holds all of it.

    Args:
        param: a parameter, DTensor or plain tensor (a plain tensor gives None, as does a
            DTensor replicated on every mesh dimension).
        who: the name that starts the error message (default ``"maskopt"``; the optimizers
            pass their class name).

    Raises:
        NotImplementedError: the placements are not ``Shard(0)`` on one mesh dimension and
            ``Replicate()`` on the others (tensor parallelism, for example).
    """
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor.placement_types import Replicate
    from torch.distributed.tensor.placement_types import Shard as ShardPlacement

    placements = param.placements
    sharded = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    if not sharded:
        return None
    bad = [
        pl
        for pl in placements
        if not isinstance(pl, (Replicate, ShardPlacement)) or (isinstance(pl, ShardPlacement) and pl.dim != 0)
    ]
    if bad or len(sharded) > 1:
        raise NotImplementedError(
            f"{who}: DTensor parameters with placements {tuple(placements)} are not supported; "
            "allowed: Shard(0) on one mesh dimension (FSDP2 fully_shard, HSDP) and Replicate() on "
            "the others. Tensor parallelism (Shard(d), d > 0) would make the selection per shard."
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)
    row = 1
    for size in param.shape[1:]:
        row *= size
    global_offset = offset[0] * row if len(offset) else 0
    return Shard(
        numel=param.numel(), offset=int(global_offset), group=param.device_mesh.get_group(sharded[0])
    )


def _misaligned(shard: Shard, n: int, block_size: int) -> str | None:
    if n == 0:
        return None
    ends_tensor = shard.offset + n == shard.numel
    if shard.offset % block_size or (n % block_size and not ends_tensor):
        return f"global offset {shard.offset}, {n} entries"
    return None


def check_block_alignment(
    shards: Sequence[tuple[torch.Tensor, Shard]], block_size: int, who: str = "maskopt"
) -> None:
    """``block_size`` blocks are selected locally, which is exact only if no block straddles
    two shards. ``shards`` holds (local tensor, its Shard) pairs. Every rank raises, or none:
    one all-reduce per process group.

    A shard is aligned when its global offset is a multiple of ``block_size`` and its length
    is too, unless it ends the tensor (the tensor's last, shorter block may end it). This is
    a collective: every rank must call it with pairs over the same process groups, in the
    same order.

    Args:
        shards: ``(local tensor, Shard)`` pairs of the sharded tensors selected per block;
            the local tensor gives the shard's length and the device of the all-reduce.
        block_size: the selection's block length in entries (a positive int).
        who: the name that starts the error message (default ``"maskopt"``).

    Raises:
        ValueError: on every rank of a process group where some shard is not aligned.
    """
    by_group: dict = {}
    for local_tensor, shard in shards:
        by_group.setdefault(id(shard.group), (shard.group, local_tensor.device, []))[2].append(
            _misaligned(shard, local_tensor.numel(), block_size)
        )
    for group, device, problems in by_group.values():
        here = next((x for x in problems if x), None)
        flag = torch.tensor([1 if here else 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if int(flag.item()):
            raise ValueError(
                f"{who}: block_size={block_size} does not fit the shards of a sharded parameter "
                f"({here or 'on another rank'}): every block must lie inside one shard. Choose a "
                "block_size that divides every shard's size (for FSDP2: the row length times the rows "
                "per rank), or block_size=None."
            )


# ------------------------------------------------------------------------------ radix select


def _float_keys(scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Non-negative scores (or their integer keys) -> int64 keys with the same order, NaN
    largest (selection.magnitude_keys), and their bit width: 31 for 32-bit keys, 63 for 64."""
    if scores.is_floating_point():
        (scores,) = magnitude_keys([scores])
    return scores.to(torch.int64), 63 if scores.dtype == torch.int64 else 31


def radix_select_across(
    histograms: Callable[[torch.Tensor, int, int], torch.Tensor],
    group: dist.ProcessGroup,
    ks: Sequence[int],
    key_bits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact k-th largest key of each of ``len(ks)`` sharded tensors, digit by digit from
    the top, with the digit histograms all-reduced over ``group``. A collective: every rank
    makes the same ``ceil(key_bits / 8)`` all-reduces of a ``(len(ks), 256)`` int64 tensor.

    Args:
        histograms: ``(prefix, high, low) -> (len(ks), 256)`` int64 CPU tensor: per tensor, the
            counts of the digit ``(key >> low) & (2**(high - low) - 1)`` over this rank's keys
            with ``key >> high == prefix[t]`` (every key at the first level).
        group: the process group the tensors are sharded over.
        ks: per tensor, how many entries it selects over the whole tensor.
        key_bits: the keys' width (31 for float32 magnitudes, 63 for float64).

    Returns:
        ``(kth, need, local_equal)``: per tensor the k-th largest key, how many entries equal to
        it the selection takes over the whole tensor, and how many of this rank's keys equal it.
    """
    count = len(ks)
    prefix = torch.zeros(count, dtype=torch.int64)
    need = torch.tensor(list(ks), dtype=torch.int64)
    passes = -(-key_bits // _PASS_BITS)
    local_equal = torch.zeros(count, dtype=torch.int64)
    for level in range(passes):
        low = max(0, key_bits - (level + 1) * _PASS_BITS)  # lowest bit of this pass's digit
        high = key_bits - level * _PASS_BITS  # bits above it are already fixed in prefix
        width = high - low
        hist = histograms(prefix, high, low)
        local = hist.cpu().clone() if level == passes - 1 else None
        dist.all_reduce(hist, group=group)
        hist = hist.cpu()
        # Digit of the k-th largest: counts from the top, first digit where they reach need.
        from_top = hist.flip(1).cumsum(1)
        pos = torch.searchsorted(from_top, need.unsqueeze(1)).squeeze(1).clamp(max=_BINS - 1)
        above = torch.where(
            pos > 0, from_top.gather(1, (pos - 1).clamp(min=0).unsqueeze(1)).squeeze(1), torch.zeros_like(pos)
        )
        digit = (_BINS - 1) - pos
        need = need - above
        prefix = (prefix << width) | digit
        if local is not None:  # the last digit: this rank's count of keys equal to the k-th
            local_equal = local.gather(1, digit.unsqueeze(1)).squeeze(1)
    return prefix, need, local_equal


def ties_to_take(
    local_equal: torch.Tensor, need: torch.Tensor, shards: Sequence[Shard], device: torch.device
) -> torch.Tensor:
    """How many of this rank's entries equal to the k-th key each tensor selects: the lowest
    global indices win, so a rank takes what the ranks before it (by offset) leave. A
    collective: one all-gather of a ``(2, len(shards))`` int64 tensor over their group.

    Args:
        local_equal: per tensor, this rank's count of entries equal to the k-th key.
        need: per tensor, how many such entries the whole tensor selects.
        shards: per tensor, its :class:`Shard` (one process group).
        device: where the collective's tensors live.
    """
    group = shards[0].group
    offsets = torch.tensor([s.offset for s in shards], dtype=torch.int64)
    mine = torch.stack([local_equal, offsets]).to(device)
    world = dist.get_world_size(group)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()  # [rank, (equal count, offset), tensor]
    take = torch.zeros(len(shards), dtype=torch.int64)
    for t in range(len(shards)):
        counts, offs = table[:, 0, t], table[:, 1, t]
        before = int(counts[offs < offsets[t]].sum())
        take[t] = max(0, min(int(local_equal[t]), int(need[t]) - before))
    return take


def _global_topk(
    keys: Sequence[torch.Tensor], shards: Sequence[Shard], ks: Sequence[int], key_bits: int
) -> list[torch.Tensor]:
    """Sorted local flat indices of each tensor's global top-``k`` by key (lowest global
    index wins ties). All tensors share one process group; collective calls are the same
    on every rank (their number depends only on ``key_bits`` and the tensor count)."""
    device = keys[0].device if keys else torch.device("cpu")

    def histograms(prefix: torch.Tensor, high: int, low: int) -> torch.Tensor:
        hist = torch.zeros((len(keys), _BINS), dtype=torch.int64, device=device)
        for t, key in enumerate(keys):
            match = key[(key >> high) == int(prefix[t])] if high < key_bits else key
            if match.numel():
                hist[t] = torch.bincount((match >> low) & ((1 << (high - low)) - 1), minlength=_BINS)
        return hist

    kth, need, local_equal = radix_select_across(histograms, shards[0].group, ks, key_bits)
    take = ties_to_take(local_equal, need, shards, device)
    out = []
    for t, key in enumerate(keys):
        keep = key > int(kth[t])
        if take[t]:
            at = (key == int(kth[t])).nonzero().squeeze(1)[: int(take[t])]
            keep[at] = True
        out.append(keep.nonzero().squeeze(1))
    return out


def shards_by_group(shards: Sequence[Shard | None]) -> dict:
    """Indices of the sharded tensors (``shards[i]`` not None) per process group, groups in order
    of first appearance (the same on every rank).

    Args:
        shards: per tensor, its :class:`Shard` or None.
    """
    groups: dict = {}
    for i, s in enumerate(shards):
        if s is not None:
            groups.setdefault(id(s.group), []).append(i)
    return groups


def topk_indices_sharded(
    scores: Sequence[torch.Tensor], shards: Sequence[Shard | None], alpha: float, block_size: int | None
) -> list[torch.Tensor]:
    """:func:`maskopt.selection.topk_indices` for local shards: exact over each whole tensor.

    With ``block_size=None`` each sharded tensor's exactly ``topk_count(shard.numel, alpha)``
    entries are found over the whole tensor by a radix select whose histograms are
    all-reduced; ties at the k-th key go to the lowest global flat index. With a
    ``block_size`` every tensor is selected locally per block, which is exact only if no
    block straddles two shards (:func:`check_block_alignment`, which this does not call).
    A collective: every rank of each process group must call it with the same tensors.

    Args:
        scores: one local tensor of scores per tensor, read flat: non-negative float scores
            or integer keys from :func:`maskopt.selection.magnitude_keys` (int32 keys are
            taken as 31-bit, int64 as 63-bit).
        shards: per tensor, its :class:`Shard`, or None for a tensor every rank holds whole
            (selected locally, as :func:`maskopt.selection.topk_indices`).
        alpha: fraction of each tensor (or block) to select, ``0 < alpha <= 1``.
        block_size: select per chunk of this many consecutive flat entries, or None over the
            whole tensor.

    Returns:
        Per tensor, the sorted local flat indices (int64) of its selected entries.
    """
    out: list[torch.Tensor | None] = [None] * len(scores)
    unsharded = [i for i, s in enumerate(shards) if s is None]
    if block_size is not None:
        unsharded = list(range(len(scores)))  # blocks inside one shard (checked in step()) are local
    if unsharded:
        for i, idx in zip(
            unsharded, topk_indices([scores[i] for i in unsharded], alpha, block_size), strict=True
        ):
            out[i] = idx
    if block_size is None:
        for members in shards_by_group(shards).values():
            keyed = {i: _float_keys(scores[i].reshape(-1)) for i in members}
            for bits in sorted({b for _, b in keyed.values()}):  # the same on every rank
                same = [i for i in members if keyed[i][1] == bits]
                ks = [topk_count(shards[i].numel, alpha) for i in same]
                found = _global_topk([keyed[i][0] for i in same], [shards[i] for i in same], ks, bits)
                for i, idx in zip(same, found, strict=True):
                    out[i] = idx
    return out  # type: ignore[return-value]


def random_indices_sharded(
    local_numels: Sequence[int],
    shards: Sequence[Shard | None],
    keys: Sequence[int],
    alpha: float,
    *,
    exact: bool,
    device,
) -> list[torch.Tensor]:
    """RandomBCD's selection on local shards: the hash of global flat indices.

    With ``exact=False`` every entry is decided on its own (``u(i) < threshold(alpha)`` on
    its global index), with no communication. With ``exact=True`` each sharded tensor's
    ``topk_count(shard.numel, alpha)`` entries with the largest ``u(i)`` are found over the
    whole tensor by an all-reduced radix select (a collective over each process group).

    Args:
        local_numels: per tensor, the number of local entries.
        shards: per tensor, its :class:`Shard`, or None for a tensor every rank holds whole.
        keys: per tensor, its :func:`maskopt._hash.stream_key` for this step.
        alpha: the selection probability (``exact=False``) or fraction (``exact=True``),
            ``0 < alpha <= 1``.
        exact: False: the Bernoulli mask (RandomBCD's default); True: exactly
            ``topk_count(numel, alpha)`` entries per whole tensor (``RandomBCD(exact=True)``).
        device: where the keys are made and the indices returned (the local tensors' device).

    Returns:
        Per tensor, the sorted local flat indices (int64) of its selected entries.
    """
    starts = [0 if s is None else s.offset for s in shards]
    shapes = [(n,) for n in local_numels]
    if not exact:  # each entry on its own: local, given the global indices
        return random_indices(shapes, keys, alpha, device=device, starts=starts)
    out: list[torch.Tensor | None] = [None] * len(shapes)
    unsharded = [i for i, s in enumerate(shards) if s is None]
    if unsharded:
        found = random_indices(
            [shapes[i] for i in unsharded], [keys[i] for i in unsharded], alpha, exact=True, device=device
        )
        for i, idx in zip(unsharded, found, strict=True):
            out[i] = idx
    for members in shards_by_group(shards).values():
        keys64 = [_hash.hash_keys(local_numels[i], keys[i], device, start=starts[i]) for i in members]
        ks = [topk_count(shards[i].numel, alpha) for i in members]
        for i, idx in zip(members, _global_topk(keys64, [shards[i] for i in members], ks, 32), strict=True):
            out[i] = idx
    return out  # type: ignore[return-value]
