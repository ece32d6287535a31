"""Plans, workspaces and device tables of the fused step (built on the host, cached).

A *plan* depends only on the shapes (and, for shards, on the whole tensors' sizes and the
shards' offsets): the chunk table that maps programs to (tensor, offset, length, segment),
the segment table of the two-pass path, and the short segments of the single-pass kernel. A
*workspace* belongs to a plan and a set of parameters and persists between steps: the
histogram rows, the segment state (the window centres among it), the zero counts and the
candidate buffer. The *tensor table* holds the addresses; each workspace owns one, rewritten
in place when an address changes. A workspace holds its plan and table, so that nothing a step
points to lives only in a cache. Layouts: ``_common``.
"""

from __future__ import annotations

import functools
import math
import struct
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ._common import C_SEG, C_START, N_SROWS, N_TROWS, N_WSROWS, S_CENTER

S_CENTER_ROW = S_CENTER.value

# ---------------------------------------------------------------------------------------
# plans: chunk and segment tables, cached per (device, shapes, selection, alpha, block_size)


def _topk_count(n: int, alpha: float) -> int:
    from maskopt.selection import topk_count

    return topk_count(n, alpha)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass
class Local:
    ltab: torch.Tensor  # int64 [N_LROWS, SL]
    n_seg: int
    bb: int
    rows: int


@dataclass
class Plan:
    ctab: torch.Tensor | None  # int64 [N_CROWS, C] streaming chunks
    n_chunks: int
    stab: torch.Tensor | None  # int64 [N_GROWS, S]: see G_* in _common
    n_seg: int
    n_cand: int  # candidate buffer length
    locals_: list
    starts_aligned: bool
    huge: bool
    # int64 [2, B]: (segment, first candidate) of each block of the candidate regions, when
    # the call's selects are spread over many programs (``_levels``); else None
    btab: torch.Tensor | None = None
    n_blocks: int = 0

    @property
    def spread(self) -> bool:
        return self.btab is not None


def _chunk_table(seg_tensor, seg_start, seg_len, chunk, seg_origin=None):
    """Split segments into chunks of at most ``chunk`` entries (vectorised); also returns
    each segment's first chunk and chunk count. ``seg_origin``: where index 0 of each
    segment's composite keys lies in its tensor (default: the segment's start; minus the
    shard's offset for a shard, whose keys use global indices)."""
    seg_tensor = torch.as_tensor(seg_tensor, dtype=torch.int64)
    seg_start = torch.as_tensor(seg_start, dtype=torch.int64)
    seg_origin = seg_start if seg_origin is None else torch.as_tensor(seg_origin, dtype=torch.int64)
    seg_len = torch.as_tensor(seg_len, dtype=torch.int64)
    nch = (seg_len + chunk - 1) // chunk
    total = int(nch.sum())
    seg = torch.repeat_interleave(torch.arange(len(nch), dtype=torch.int64), nch)
    first = torch.cumsum(nch, 0) - nch
    j = torch.arange(total, dtype=torch.int64) - first[seg]
    start = seg_start[seg] + j * chunk
    length = torch.minimum(torch.full_like(start, chunk), seg_len[seg] - j * chunk)
    return torch.stack([seg_tensor[seg], start, length, seg, seg_origin[seg]]), total, first, nch


def _block_table(caps, block: int) -> tuple[torch.Tensor, int]:
    """(segment, first candidate) of every ``block`` candidates of each segment's region: the
    chunk table of the regions, two of its rows."""
    zeros = [0] * len(caps)
    table, total, _, _ = _chunk_table(zeros, zeros, caps, block)
    return table[[C_SEG.value, C_START.value]].contiguous(), total


def _build_plan(numels, selection, alpha, block_size, cfg, device, sharding=None) -> Plan:
    if sharding is not None:
        return _build_sharded_plan(numels, selection, alpha, cfg, device, sharding)
    huge = any(n > (1 << 32) for n in numels)
    if selection in ("all", "random"):
        ts = [i for i, n in enumerate(numels) if n > 0]
        ctab, total, _, _ = _chunk_table(ts, [0] * len(ts), [numels[i] for i in ts], cfg.chunk)
        return Plan(ctab.to(device), total, None, 0, 0, [], True, huge)

    use_blocks = block_size is not None and selection != "random_exact"
    seg_t: list[int] = []
    seg_s: list[int] = []
    seg_n: list[int] = []
    for i, n in enumerate(numels):
        if n == 0:
            continue
        if use_blocks and n > block_size:
            nb = -(-n // block_size)
            seg_t += [i] * nb
            seg_s += range(0, n, block_size)
            seg_n += [block_size] * (nb - 1) + [n - (nb - 1) * block_size]
        else:
            seg_t.append(i)
            seg_s.append(0)
            seg_n.append(n)
    kcache: dict[int, int] = {}

    def kof(n):
        if n not in kcache:
            kcache[n] = _topk_count(n, alpha)
        return kcache[n]

    idx_limit = (1 << 31) if selection == "random_exact" else (1 << 32)
    loc: dict[int, list] = {}
    g_t, g_s, g_n, g_k = [], [], [], []
    for t, s, n in zip(seg_t, seg_s, seg_n, strict=True):
        if n <= cfg.local_max:
            bb = max(16, _next_pow2(n))
            loc.setdefault(bb, []).append((t, s, n, kof(n)))
        else:
            if n > idx_limit:
                raise ValueError(
                    f"a selection segment of {n} entries is too large for the fused "
                    f"{selection!r} path (limit {idx_limit}); use block_size or fused=False"
                )
            g_t.append(t)
            g_s.append(s)
            g_n.append(n)
            g_k.append(kof(n))
    # Two row widths at most, short and long, whatever the number of tensors: a launch costs
    # more than the masked lanes of a short segment in a wider row.
    classes: dict[bool, list] = {}
    for bb in sorted(loc):
        classes.setdefault(bb <= _SHORT_ROW, []).append(bb)
    locals_ = []
    for widths in classes.values():
        bb = max(widths)
        rows = [row for w in widths for row in loc[w]]
        ltab = torch.tensor(rows, dtype=torch.int64).T.contiguous()
        locals_.append(Local(ltab.to(device), len(rows), bb, max(1, min(_MAX_ROWS, cfg.local_tile // bb))))
    n_seg = len(g_t)
    ctab = stab = None
    total = n_cand = 0
    if n_seg:
        ctab, total, first, nch = _chunk_table(g_t, g_s, g_n, cfg.chunk)
        ctab = ctab.to(device)
        caps = [min(n, max(cfg.cand_min, math.ceil(n * cfg.cand_frac))) for n in g_n]
        coff = [0] * n_seg
        for i in range(1, n_seg):
            coff[i] = coff[i - 1] + caps[i - 1]
        n_cand = coff[-1] + caps[-1]
        stab = torch.tensor(
            [g_k, caps, coff, g_t, g_s, g_n, first.tolist(), nch.tolist()], dtype=torch.int64
        ).to(device)
    aligned = all(s % 16 == 0 for s in g_s)
    plan = Plan(ctab, total, stab, n_seg, n_cand, locals_, aligned, huge)
    if n_seg and max(g_n) >= cfg.spread_min:
        btab, plan.n_blocks = _block_table(caps, cfg.cand_block)
        plan.btab = btab.to(device)
    return plan


def _build_sharded_plan(numels, selection, alpha, cfg, device, sharding) -> Plan:
    """Every local shard is one segment of the two-pass path, its keys on global indices,
    its k and candidate capacity from the whole tensor (the same on every rank, so that
    every rank takes the same decisions)."""
    world = sharding.world
    huge = any(n > (1 << 32) for n in sharding.numels)
    idx_limit = (1 << 31) if selection == "random_exact" else (1 << 32)
    g_t = [i for i, n in enumerate(numels) if sharding.numels[i] > 0]
    for i in g_t:
        if sharding.numels[i] > idx_limit:
            raise ValueError(
                f"a sharded tensor of {sharding.numels[i]} entries is too large for the fused "
                f"{selection!r} path (limit {idx_limit}); use fused=False"
            )
    n_seg = len(g_t)
    if not n_seg:
        return Plan(None, 0, None, 0, 0, [], True, huge)
    g_n = [numels[i] for i in g_t]
    g_k = [_topk_count(sharding.numels[i], alpha) for i in g_t]
    origin = [-sharding.offsets[i] for i in g_t]
    ctab, total, first, nch = _chunk_table(g_t, [0] * n_seg, g_n, cfg.chunk, seg_origin=origin)
    caps = [
        min(sharding.numels[i], max(cfg.cand_min, math.ceil(sharding.numels[i] * cfg.cand_frac / world)))
        for i in g_t
    ]
    coff = [0] * n_seg
    for i in range(1, n_seg):
        coff[i] = coff[i - 1] + caps[i - 1]
    stab = torch.tensor([g_k, caps, coff, g_t, origin, g_n, first.tolist(), nch.tolist()], dtype=torch.int64)
    btab, n_blocks = _block_table(caps, cfg.cand_block)
    return Plan(
        ctab.to(device),
        total,
        stab.to(device),
        n_seg,
        coff[-1] + caps[-1],
        [],
        True,
        huge,
        btab.to(device),
        n_blocks,
    )


@dataclass(frozen=True)
class Sharding:
    """The tensors of one call are shards over one process group (FSDP2)."""

    group: object
    rank: int  # this rank's position in the group, which is also its shards' order
    world: int
    numels: tuple  # whole tensors
    offsets: tuple  # global flat index of each local shard's first entry


_CHECKED_ORDER: set = set()


def sharding_of(params, shards) -> Sharding | None:
    """The sharding of a call (None: no shard), checked: one process group, and shards laid
    out in rank order (as FSDP2's ``Shard(0)``), which the zero ranking relies on."""
    import torch.distributed as dist

    if shards is None or all(s is None for s in shards):
        return None
    if any(s is None for s in shards) or len({id(s.group) for s in shards}) != 1:
        raise ValueError(
            "fused_adam_step_: sharded and whole tensors, or shards over different process "
            "groups, must be stepped in separate calls"
        )
    group = shards[0].group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    offsets = tuple(int(s.offset) for s in shards)
    numels = tuple(int(s.numel) for s in shards)
    key = (id(group), numels, offsets)
    if key not in _CHECKED_ORDER:  # once per layout: a collective and a host sync
        mine = torch.tensor(offsets, dtype=torch.int64, device=params[0].device)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=group)
        table = torch.stack(every).cpu()
        if not bool((table[1:] >= table[:-1]).all()):
            raise NotImplementedError(
                "the fused path needs shards in rank order (FSDP2's Shard(0)); "
                "use fused=False for this layout"
            )
        _CHECKED_ORDER.add(key)
    return Sharding(group, rank, world, numels, offsets)


_SHORT_ROW = 256
_MAX_ROWS = 8  # rows per program of the single-pass kernel: more spill registers on sm_90
PLANS: OrderedDict = OrderedDict()
_MAX_PLANS = 64


def plan_cache_key(numels, selection, alpha, block_size, device, sharding=None) -> tuple:
    """What a plan depends on (besides the kernel config): the key of :data:`PLANS`."""
    kind = selection if selection not in ("all", "random") else "dense"
    if kind == "dense":
        sharding = None  # entry by entry: global indices come from the tensor table
    return (
        str(device),
        tuple(numels),
        kind,
        None if kind == "dense" else float(alpha),
        block_size if kind.startswith("topk") else None,
        None if sharding is None else (sharding.world, sharding.numels, sharding.offsets),
    )


def plan_for(numels, selection, alpha, block_size, device, cfg, sharding=None):
    """The plan of these shapes and its cache key."""
    key = plan_cache_key(numels, selection, alpha, block_size, device, sharding)
    plan = PLANS.get(key)
    if plan is None:
        if key[2] == "dense":
            sharding = None
        plan = _build_plan(numels, selection, alpha, block_size, cfg, device, sharding)
        PLANS[key] = plan
        if len(PLANS) > _MAX_PLANS:
            PLANS.popitem(last=False)
    else:
        PLANS.move_to_end(key)
    return plan, key


# ---------------------------------------------------------------------------------------
# workspaces: per plan and set of parameters, kept between steps (the window centres are
# per-segment state; the histogram rows, candidate counts and zero counts are reset by the
# kernels that consume them), so a step allocates and clears nothing. A workspace lives as
# long as the step counter of the call's first tensor, i.e. as long as the optimizer state
# it serves: no cache size can make an optimizer with many param groups lose its windows
# (each loss costs a fallback step), and a dropped optimizer takes its workspaces along.
# It holds everything its kernels point to (its plan, its tensor table), so that a CUDA
# graph that captured a step never points into memory a cache has freed.


@dataclass
class Workspace:
    key: tuple  # the plan key and the parameters' addresses it was built for
    ws: torch.Tensor  # fp32 [N_WSROWS, T]: bias corrections and step, written by the prologue
    sst: torch.Tensor | None = None  # int64 [N_SROWS, S]: see S_* in _common
    # int64 [S, NB]: pass 1's window histogram (int64: one bin may hold all of a segment's
    # 2**32 entries); for shards, summed over the ranks
    hist: torch.Tensor | None = None
    hist_max: torch.Tensor | None = None  # int64 [S, NB], shards only: each bin's largest count on a rank
    zcount: torch.Tensor | None = None  # int64 [C]: zeros per chunk, then zeros before it
    cand: torch.Tensor | None = None  # int64 candidate composites
    ztotal: torch.Tensor | None = None  # int64 [world, S]: zeros per rank (MODE_ZERO)
    levels: torch.Tensor | None = None  # int64 [S, 256]: the level-by-level histograms (``_levels``)
    plan: Plan | None = None  # the plan its launches read (held here, not only in PLANS)
    table: torch.Tensor | None = None  # int64 [N_TROWS, T]: the tensor table, rewritten in place
    table_rows: tuple | None = None  # the addresses and keys ``table`` holds (None: not written)
    # Set from pass 1 until the resolve returns: an exception in between (a compile failure,
    # Ctrl-C, a failed all-reduce) leaves counts in the histograms that the next step clears.
    dirty: bool = False


# id(step counter) -> (a weak reference to it, its workspace). Not a WeakKeyDictionary: that
# compares keys with ==, which for tensors compares values.
WORKSPACES: dict[int, tuple[weakref.ref, Workspace]] = {}


def _initial_center(frac: int) -> int:
    """Window centre before the first threshold is known: the fine key of 1e-4."""
    return struct.unpack("<I", struct.pack("<f", 1e-4))[0] >> (23 - frac)


def _workspace_key(plan_key, params, cfg) -> tuple:
    return (plan_key, cfg, tuple(p.data_ptr() for p in params))


def find_workspace(plan_key, params, steps, cfg) -> Workspace | None:
    """The workspace built for these tensors, plan and kernel config, or None."""
    entry = WORKSPACES.get(id(steps[0]))
    if entry is None or entry[0]() is not steps[0]:
        return None  # none, or another tensor's, whose id this one now has
    work = entry[1]
    return work if work.key == _workspace_key(plan_key, params, cfg) else None


def workspace_for(plan_key, plan: Plan, params, steps, device, cfg, world: int = 1) -> Workspace:
    found = find_workspace(plan_key, params, steps, cfg)
    if found is not None:
        return found
    anchor = steps[0]
    entry = WORKSPACES.get(id(anchor))
    if entry is not None and entry[0]() is not anchor:
        entry = None  # another tensor's, whose id this one now has
    work = Workspace(
        _workspace_key(plan_key, params, cfg),
        torch.empty((N_WSROWS, len(params)), dtype=torch.float32, device=device),
        plan=plan,
        table=torch.empty((N_TROWS, len(params)), dtype=torch.int64, device=device),
    )
    if plan.n_seg:
        work.sst = torch.zeros((N_SROWS, plan.n_seg), dtype=torch.int64, device=device)
        work.sst[S_CENTER_ROW] = _initial_center(cfg.window_frac)
        work.hist = torch.zeros((plan.n_seg, 1 << cfg.window_bins_log2), dtype=torch.int64, device=device)
        work.zcount = torch.zeros(max(1, plan.n_chunks), dtype=torch.int64, device=device)
        work.cand = torch.empty(max(1, plan.n_cand), dtype=torch.int64, device=device)
        work.ztotal = torch.zeros((world, plan.n_seg), dtype=torch.int64, device=device)
        if plan.spread:
            work.levels = torch.zeros((plan.n_seg, 256), dtype=torch.int64, device=device)
        if plan_key[-1] is not None:  # sharded
            work.hist_max = torch.zeros_like(work.hist)
    if entry is None:
        weakref.finalize(anchor, WORKSPACES.pop, id(anchor), None)
    WORKSPACES[id(anchor)] = (weakref.ref(anchor), work)
    return work


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_grid(n_items: int, device: torch.device, cfg) -> tuple[int, int]:
    """(programs, items per program) of a persistent grid over ``n_items`` chunks or candidate
    blocks: at most ``cfg.programs`` programs (0: 4 per SM, 8 on CPU), none left without items."""
    if not n_items:
        return 0, 0
    want = cfg.programs
    if not want:
        if device.type == "cuda":
            want = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        else:
            want = 8
    per_program = -(-n_items // max(1, min(n_items, want)))
    return -(-n_items // per_program), per_program


# ---------------------------------------------------------------------------------------
# tensor tables: one per workspace, rewritten in place when an address changes

CAPTURE_REFUSAL = (
    "a fused step cannot write its device address table while a CUDA graph is being captured: "
    "{what}. Keep the gradients at fixed addresses (zero_grad(set_to_none=False), or copy new "
    "gradients into .grad) and run one eager step with the same tensors before capturing"
)


def reset_accumulators(work: Workspace) -> None:
    """Zero the histograms that pass 1 and the level passes add into (in place: a captured
    step keeps pointing at them). The kernels that consume them reset them on every step
    that completes, so this is needed only after a step stopped between the two."""
    for counts in (work.hist, work.levels):
        if counts is not None:
            counts.zero_()
    work.dirty = False


def tensor_table(
    work: Workspace, params, grads, ms, vs, steps, hkeys, bases, capturing: bool
) -> torch.Tensor:
    """``work``'s tensor table holding these tensors' addresses, numels and hash keys.

    The table is rewritten in place (same device buffer) when an entry changed, from a pinned
    host buffer with a non-blocking copy: no host synchronisation, and a CUDA graph that
    captured a step keeps a valid table (it reads the addresses of the last step written).
    The caching host allocator keeps the pinned buffer until the copy has run.

    Raises:
        RuntimeError: an entry changed while ``capturing`` (a CUDA graph capture).
    """
    rows = (
        tuple(p.data_ptr() for p in params),
        tuple(g.data_ptr() for g in grads),
        tuple(m.data_ptr() for m in ms),
        tuple(v.data_ptr() for v in vs),
        tuple(s.data_ptr() for s in steps),
        tuple(p.numel() for p in params),
        tuple(hkeys),
        tuple(bases),
    )
    table = work.table
    assert table is not None  # workspace_for allocates it
    if rows != work.table_rows:
        if capturing:
            raise RuntimeError(
                CAPTURE_REFUSAL.format(what="a gradient, parameter or state tensor is at a new address")
            )
        host = torch.tensor(rows, dtype=torch.int64, pin_memory=table.is_cuda)
        table.copy_(host, non_blocking=True)
        work.table_rows = rows
    return table
