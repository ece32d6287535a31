"""Launchers: argument checks, device tables, workspaces and the launch sequence.

One call steps one parameter group. Tensors are grouped by parameter dtype (one launch
sequence per dtype present, at most three); within a group every launch covers all of its
tensors through int64 device tables (addresses, numels, chunk -> (tensor, offset) map), so the
number of launches does not grow with the number of tensors:

* ``all`` / ``random``: prologue + one fused pass (``_dense``): 2 launches.
* ``topk_*`` / ``random_exact``: prologue, then
  - segments of at most ``local_max`` entries (``block_size`` blocks, small tensors such as
    norms and biases): one fused pass that selects in registers (``_local``, one launch per
    power-of-two row width present);
  - longer segments, exact in two passes over the data: moments + window histogram
    (``_window``), window select, exact fallback (exits at once unless a segment needs it,
    ``_fallback``), masked apply + candidate compaction (``_apply``), candidate resolve
    (``_resolve``): 5 launches.

No host synchronisation: the step counters, bias corrections, thresholds, windows and the
GradScaler skip flag stay on the device, and the workspaces persist between steps (the
kernels reset what they use).
"""

from __future__ import annotations

import functools
import math
import os
import struct
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import triton

from maskopt import _hash

from ._apply import apply_compact_kernel
from ._common import (
    DECAY_ALL, DECAY_MASKED, DECAY_NONE, KEY_GRADIENT, KEY_HASH, KEY_MOMENTUM, N_SROWS,
    MODE_EXACT, MODE_WINDOW, N_WSROWS, S_CENTER, S_ZBASE, prologue_kernel,
)
from ._dense import dense_step_kernel
from ._fallback import exact_select_kernel
from ._local import local_step_kernel
from ._resolve import resolve_kernel
from ._sharded import cand_level_kernel, data_level_kernel, level_select_kernel
from ._window import moments_window_kernel, window_select_kernel

S_CENTER_ROW = S_CENTER.value
S_ZBASE_ROW = S_ZBASE.value
SELECTIONS = ("all", "topk_momentum", "topk_gradient", "random", "random_exact")
_MOMENT_DTYPES = (torch.float32, torch.bfloat16)
_PARAM_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_KEY_MODE = {"topk_momentum": KEY_MOMENTUM, "topk_gradient": KEY_GRADIENT, "random_exact": KEY_HASH}


@dataclass(frozen=True)
class KernelConfig:
    """Tuning knobs (tests shrink them so that every path runs on small tensors)."""

    chunk: int = 4096  # entries per chunk of the streaming kernels (power of two)
    local_max: int = 4096  # segments up to this many entries are selected in registers
    local_tile: int = 4096  # entries per program of the local kernel
    # Window histogram of pass 1: 2**window_frac bins per binade, 2**window_bins_log2 bins in
    # all (the window spans about 16 binades at 5 and 9: the threshold may move by 2**8
    # either way between steps before the exact fallback has to run).
    window_frac: int = 5
    window_bins_log2: int = 9
    cand_frac: float = 1 / 32  # candidate capacity per segment, as a share of its entries...
    cand_min: int = 256  # ...but at least this many (a fuller boundary bin takes the fallback)
    programs: int = 0  # persistent programs of the streaming kernels; 0: 4 per SM (8 on CPU)
    num_warps: int = 8  # streaming kernels (chunk 4096: 16 entries per thread)
    local_num_warps: int = 16  # local kernel (tile 4096: no spills on sm_90)
    select_num_warps: int = 4
    resolve_tile: int = 2048  # candidates per iteration of the resolve


_CONFIG = KernelConfig()


def get_config() -> KernelConfig:
    return _CONFIG


def set_config(**changes) -> KernelConfig:
    """Replace config fields; returns the previous config."""
    global _CONFIG
    old = _CONFIG
    new = replace(old, **changes)
    for name in ("chunk", "local_tile"):
        v = getattr(new, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if not 0 <= new.window_frac <= 7 or not 4 <= new.window_bins_log2 <= 11:
        raise ValueError(f"window_frac must be in [0, 7] and window_bins_log2 in [4, 11], got "
                         f"{new.window_frac} and {new.window_bins_log2}")
    _CONFIG = new
    _PLANS.clear()
    _WORKSPACES.clear()
    return old


@contextmanager
def config(**changes):
    old = set_config(**changes)
    try:
        yield get_config()
    finally:
        set_config(**vars(old))


# ---------------------------------------------------------------------------------------
# availability

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _kernels_interpreted() -> bool:
    from . import _common

    return type(_common.prologue_kernel).__name__ == "InterpretedFunction"


def check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if _kernels_interpreted():
            raise RuntimeError(
                "maskopt.kernels were imported with TRITON_INTERPRET=1; CUDA tensors need the "
                "compiled kernels (unset TRITON_INTERPRET before importing maskopt.kernels)")
        return
    if device.type == "cpu":
        if not _kernels_interpreted():
            raise RuntimeError(
                "the fused (Triton) path runs on CPU only under the Triton interpreter: set "
                "TRITON_INTERPRET=1 before maskopt.kernels is first used, or use fused=False")
        return
    raise RuntimeError(f"the fused (Triton) path supports CUDA (and CPU under TRITON_INTERPRET=1), "
                       f"not {device.type!r}; use fused=False")


# ---------------------------------------------------------------------------------------
# plans: chunk and segment tables, cached per (device, shapes, selection, alpha, block_size)

def _topk_count(n: int, alpha: float) -> int:
    from maskopt.selection import topk_count

    return topk_count(n, alpha)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass
class _Local:
    ltab: torch.Tensor  # int64 [N_LROWS, SL]
    n_seg: int
    bb: int
    rows: int


@dataclass
class _Plan:
    ctab: torch.Tensor | None  # int64 [N_CROWS, C] streaming chunks
    n_chunks: int
    stab: torch.Tensor | None  # int64 [N_GROWS, S]: see G_* in _common
    n_seg: int
    n_cand: int  # candidate buffer length
    locals_: list
    starts_aligned: bool
    huge: bool


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


def _build_plan(numels, selection, alpha, block_size, cfg, device, sharding=None) -> _Plan:
    if sharding is not None:
        return _build_sharded_plan(numels, selection, alpha, cfg, device, sharding)
    huge = any(n > (1 << 32) for n in numels)
    if selection in ("all", "random"):
        ts = [i for i, n in enumerate(numels) if n > 0]
        ctab, total, _, _ = _chunk_table(ts, [0] * len(ts), [numels[i] for i in ts], cfg.chunk)
        return _Plan(ctab.to(device), total, None, 0, 0, [], True, huge)

    use_blocks = block_size is not None and selection != "random_exact"
    seg_t, seg_s, seg_n = [], [], []
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
    for t, s, n in zip(seg_t, seg_s, seg_n):
        if n <= cfg.local_max:
            bb = max(16, _next_pow2(n))
            loc.setdefault(bb, []).append((t, s, n, kof(n)))
        else:
            if n > idx_limit:
                raise ValueError(f"a selection segment of {n} entries is too large for the fused "
                                 f"{selection!r} path (limit {idx_limit}); use block_size or fused=False")
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
        locals_.append(_Local(ltab.to(device), len(rows), bb, max(1, cfg.local_tile // bb)))
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
        stab = torch.tensor([g_k, caps, coff, g_t, g_s, g_n, first.tolist(), nch.tolist()],
                            dtype=torch.int64).to(device)
    aligned = all(s % 16 == 0 for s in g_s)
    return _Plan(ctab, total, stab, n_seg, n_cand, locals_, aligned, huge)


def _build_sharded_plan(numels, selection, alpha, cfg, device, sharding) -> _Plan:
    """Every local shard is one segment of the two-pass path, its keys on global indices,
    its k and candidate capacity from the whole tensor (the same on every rank, so that
    every rank takes the same decisions)."""
    world = sharding.world
    huge = any(n > (1 << 32) for n in sharding.numels)
    idx_limit = (1 << 31) if selection == "random_exact" else (1 << 32)
    g_t = [i for i, n in enumerate(numels) if sharding.numels[i] > 0]
    for i in g_t:
        if sharding.numels[i] > idx_limit:
            raise ValueError(f"a sharded tensor of {sharding.numels[i]} entries is too large for the fused "
                             f"{selection!r} path (limit {idx_limit}); use fused=False")
    n_seg = len(g_t)
    if not n_seg:
        return _Plan(None, 0, None, 0, 0, [], True, huge)
    g_n = [numels[i] for i in g_t]
    g_k = [_topk_count(sharding.numels[i], alpha) for i in g_t]
    origin = [-sharding.offsets[i] for i in g_t]
    ctab, total, first, nch = _chunk_table(g_t, [0] * n_seg, g_n, cfg.chunk, seg_origin=origin)
    caps = [min(sharding.numels[i], max(cfg.cand_min, math.ceil(sharding.numels[i] * cfg.cand_frac / world)))
            for i in g_t]
    coff = [0] * n_seg
    for i in range(1, n_seg):
        coff[i] = coff[i - 1] + caps[i - 1]
    stab = torch.tensor([g_k, caps, coff, g_t, origin, g_n, first.tolist(), nch.tolist()], dtype=torch.int64)
    return _Plan(ctab.to(device), total, stab.to(device), n_seg, coff[-1] + caps[-1], [], True, huge)


@dataclass(frozen=True)
class _Sharding:
    """The tensors of one call are shards over one process group (FSDP2)."""

    group: object
    rank: int  # this rank's position in the group, which is also its shards' order
    world: int
    numels: tuple  # whole tensors
    offsets: tuple  # global flat index of each local shard's first entry


_CHECKED_ORDER: set = set()


def _sharding(params, shards) -> _Sharding | None:
    """The sharding of a call (None: no shard), checked: one process group, and shards laid
    out in rank order (as FSDP2's ``Shard(0)``), which the zero ranking relies on."""
    import torch.distributed as dist

    if shards is None or all(s is None for s in shards):
        return None
    if any(s is None for s in shards) or len({id(s.group) for s in shards}) != 1:
        raise ValueError("fused_adam_step_: sharded and whole tensors, or shards over different process "
                         "groups, must be stepped in separate calls")
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
            raise NotImplementedError("the fused path needs shards in rank order (FSDP2's Shard(0)); "
                                      "use fused=False for this layout")
        _CHECKED_ORDER.add(key)
    return _Sharding(group, rank, world, numels, offsets)


_SHORT_ROW = 256
_PLANS: OrderedDict = OrderedDict()
_MAX_PLANS = 64


def _plan(numels, selection, alpha, block_size, device, sharding=None):
    """The plan of these shapes and its cache key."""
    cfg = _CONFIG
    kind = selection if selection not in ("all", "random") else "dense"
    if kind == "dense":
        sharding = None  # entry by entry: global indices come from the tensor table
    key = (str(device), tuple(numels), kind,
           None if kind == "dense" else float(alpha),
           block_size if kind.startswith("topk") else None,
           None if sharding is None else (sharding.world, sharding.numels, sharding.offsets))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _build_plan(numels, selection, alpha, block_size, cfg, device, sharding)
        _PLANS[key] = plan
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan, key


# ---------------------------------------------------------------------------------------
# workspaces: per plan and set of parameters, kept between steps (the window centres are
# per-segment state; the histogram rows, candidate counts and zero counts are reset by the
# kernels that consume them), so a step allocates and clears nothing

@dataclass
class _Workspace:
    ws: torch.Tensor  # fp32 [N_WSROWS, T]: bias corrections and step, written by the prologue
    sst: torch.Tensor | None = None  # int64 [N_SROWS, S]: see S_* in _common
    hist: torch.Tensor | None = None  # int32 [S, NB]
    zcount: torch.Tensor | None = None  # int64 [C]: zeros per chunk, then zeros before it
    cand: torch.Tensor | None = None  # int64 candidate composites
    ztotal: torch.Tensor | None = None  # int64 [world, S]: zeros per rank (MODE_ZERO)
    levels: torch.Tensor | None = None  # int32 [S, 256]: the sharded level-by-level histograms


_WORKSPACES: OrderedDict = OrderedDict()
_MAX_WORKSPACES = 64


def _initial_center(frac: int) -> int:
    """Window centre before the first threshold is known: the fine key of 1e-4."""
    return struct.unpack("<I", struct.pack("<f", 1e-4))[0] >> (23 - frac)


def _workspace(plan_key, plan: _Plan, params, device, world: int = 1) -> _Workspace:
    key = (plan_key, tuple(p.data_ptr() for p in params))
    work = _WORKSPACES.get(key)
    if work is not None:
        _WORKSPACES.move_to_end(key)
        return work
    cfg = _CONFIG
    work = _Workspace(torch.empty((N_WSROWS, len(params)), dtype=torch.float32, device=device))
    if plan.n_seg:
        work.sst = torch.zeros((N_SROWS, plan.n_seg), dtype=torch.int64, device=device)
        work.sst[S_CENTER_ROW] = _initial_center(cfg.window_frac)
        work.hist = torch.zeros((plan.n_seg, 1 << cfg.window_bins_log2), dtype=torch.int32, device=device)
        work.zcount = torch.zeros(max(1, plan.n_chunks), dtype=torch.int64, device=device)
        work.cand = torch.empty(max(1, plan.n_cand), dtype=torch.int64, device=device)
        work.ztotal = torch.zeros((world, plan.n_seg), dtype=torch.int64, device=device)
        if world > 1 or plan_key[-1] is not None:
            work.levels = torch.zeros((plan.n_seg, 256), dtype=torch.int32, device=device)
    _WORKSPACES[key] = work
    if len(_WORKSPACES) > _MAX_WORKSPACES:
        _WORKSPACES.popitem(last=False)
    return work


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(n_chunks: int, device: torch.device) -> int:
    """Persistent programs for the streaming kernels."""
    want = _CONFIG.programs
    if not want:
        if device.type == "cuda":
            want = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        else:
            want = 8
    return max(1, min(n_chunks, want))


# ---------------------------------------------------------------------------------------
# tensor tables (addresses change whenever grads are reallocated: rebuilt, small LRU)

_debug_capture: list | None = None  # set to a list to record each step's segment state

_TTABS: OrderedDict = OrderedDict()
_MAX_TTABS = 16


def _tensor_table(params, grads, ms, vs, steps, hkeys, bases, device) -> torch.Tensor:
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
    key = (str(device), rows)
    tab = _TTABS.get(key)
    if tab is None:
        tab = torch.tensor(rows, dtype=torch.int64).to(device)
        _TTABS[key] = tab
        if len(_TTABS) > _MAX_TTABS:
            _TTABS.popitem(last=False)
    else:
        _TTABS.move_to_end(key)
    return tab


# ---------------------------------------------------------------------------------------
# argument checks

def _check(params, grads, exp_avgs, exp_avg_sqs, state_steps, selection, alpha, block_size,
           tensor_indices, grad_scale, found_inf):
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("state_steps", state_steps)):
        if len(lst) != n:
            raise ValueError(f"fused_adam_step_: len({name})={len(lst)} != len(params)={n}")
    if selection not in SELECTIONS:
        raise ValueError(f"fused_adam_step_: selection must be one of {SELECTIONS}, got {selection!r}")
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"fused_adam_step_: alpha must be in (0, 1], got {alpha}")
    if block_size is not None and (int(block_size) != block_size or block_size < 1):
        raise ValueError(f"fused_adam_step_: block_size must be a positive int or None, got {block_size}")
    if selection in ("random", "random_exact") and len(tensor_indices) != n:
        raise ValueError(f"fused_adam_step_: len(tensor_indices)={len(tensor_indices)} != len(params)={n}")
    device = params[0].device
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)):
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(f"fused_adam_step_: param {i} has dtype {p.dtype}; the fused path supports "
                            f"float32, bfloat16 and float16 (use fused=False)")
        if g.is_sparse or g.layout != torch.strided:
            raise TypeError(f"fused_adam_step_: grad {i} is sparse; the fused path needs dense gradients")
        if g.dtype != p.dtype:
            raise TypeError(f"fused_adam_step_: grad {i} has dtype {g.dtype}, param has {p.dtype}")
        if m.dtype not in _MOMENT_DTYPES or v.dtype != m.dtype:
            raise TypeError(f"fused_adam_step_: exp_avg/exp_avg_sq {i} must both be float32 or both "
                            f"bfloat16, got {m.dtype}/{v.dtype}")
        if s.dtype != torch.float32 or s.numel() != 1:
            raise TypeError(f"fused_adam_step_: state_steps[{i}] must be a float32 scalar tensor, "
                            f"got dtype {s.dtype} with {s.numel()} elements")
        for name, x in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v), ("step", s)):
            if x.device != device:
                raise ValueError(f"fused_adam_step_: {name} {i} is on {x.device}, expected {device} "
                                 f"(one launch covers tensors of one device)")
        for name, x in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if x.shape != p.shape:
                raise ValueError(f"fused_adam_step_: {name} {i} has shape {tuple(x.shape)}, "
                                 f"param has {tuple(p.shape)}")
        for name, x in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if not x.is_contiguous():
                raise ValueError(f"fused_adam_step_: {name} {i} is not contiguous; the fused path "
                                 f"needs contiguous tensors (call .contiguous() or use fused=False)")
    for name, x in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if x is not None and (x.device != device or x.numel() != 1):
            raise ValueError(f"fused_adam_step_: {name} must be a one-element tensor on {device}, "
                             f"got {x.numel()} elements on {x.device}")
    return device


def _split(x: float) -> tuple[float, float]:
    """x as a pair of fp32 values whose fp64 sum is x to ~48 bits."""
    hi = _to_fp32(x)
    return hi, _to_fp32(x - hi)


def _to_fp32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# ---------------------------------------------------------------------------------------
# the public entry point

def fused_adam_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    policy,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    mask_weight_decay: bool,
    tensor_indices: Sequence[int],
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    shards: Sequence | None = None,
) -> None:
    """One masked-AdamW step of one parameter group (docs/semantics.md), in place.

    Args:
        params, grads, exp_avgs, exp_avg_sqs, state_steps: per-tensor lists on one CUDA device
            (or CPU under TRITON_INTERPRET=1); contiguous; float32 moments and step counters.
        policy: the ``maskopt.policy.SelectionPolicy`` shared by all the tensors.
        lr, beta1, beta2, eps, weight_decay, mask_weight_decay: the AdamW hyperparameters.
        tensor_indices: each tensor's index in its optimizer (keys the random masks).
        grad_scale, found_inf: GradScaler's one-element tensors, or None.
        shards: None, or per tensor its ``maskopt.distributed.Shard``: every tensor the local
            shard of a larger one, all over one process group, in rank order (FSDP2). The
            selection is then exact over each whole tensor: histograms are all-reduced
            between launches (a fixed number of collectives per step, on the stream). Every
            rank of the group must make the same call.
    """
    if len(params) == 0:
        return
    selection = "all" if policy.moves_all else policy.kind
    alpha, block_size, seed, hash_counter = policy.alpha, policy.block_size, policy.seed, policy.counter
    device = _check(params, grads, exp_avgs, exp_avg_sqs, state_steps, selection, alpha,
                    block_size, tensor_indices, grad_scale, found_inf)
    check_device(device)
    # Shards hash their global indices; a whole-tensor selection is taken across the ranks,
    # while blocks lie inside one shard (the optimizer checks it) and are selected locally.
    bases = [0] * len(params) if shards is None else [0 if s is None else int(s.offset) for s in shards]
    across = selection in ("topk_momentum", "topk_gradient", "random_exact") and not (
        block_size is not None and selection.startswith("topk"))
    sharding = _sharding(params, shards) if across else None
    by_dtype: dict[tuple, list[int]] = {}
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        by_dtype.setdefault((p.dtype, m.dtype), []).append(i)
    # Triton launches on the current CUDA device: make it the tensors' device
    guard = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    with guard:
        _step_dtype_groups(by_dtype, params, grads, exp_avgs, exp_avg_sqs, state_steps, tensor_indices,
                           device, selection=selection, alpha=alpha, block_size=block_size, lr=lr,
                           beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                           mask_weight_decay=mask_weight_decay, seed=seed, hash_counter=hash_counter,
                           grad_scale=grad_scale, found_inf=found_inf, sharding=sharding, bases=bases)


def _step_dtype_groups(by_dtype, params, grads, exp_avgs, exp_avg_sqs, state_steps, tensor_indices, device,
                       *, selection, alpha, block_size, lr, beta1, beta2, eps, weight_decay,
                       mask_weight_decay, seed, hash_counter, grad_scale, found_inf, sharding, bases):
    for (dtype, mdtype), idx in by_dtype.items():
        part = None if sharding is None else replace(
            sharding, numels=tuple(sharding.numels[i] for i in idx), offsets=tuple(sharding.offsets[i] for i in idx))
        _step_group(
            [params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx], [state_steps[i] for i in idx],
            [tensor_indices[i] for i in idx] if selection in ("random", "random_exact") else None,
            dtype, mdtype, device, selection=selection, alpha=float(alpha), block_size=block_size,
            lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
            weight_decay=float(weight_decay), mask_weight_decay=bool(mask_weight_decay),
            seed=int(seed), hash_counter=hash_counter, grad_scale=grad_scale, found_inf=found_inf,
            sharding=part, bases=[bases[i] for i in idx])


def _tl_dtype(dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _step_group(params, grads, ms, vs, steps, tidx, dtype, mdtype, device, *, selection, alpha, block_size,
                lr, beta1, beta2, eps, weight_decay, mask_weight_decay, seed, hash_counter,
                grad_scale, found_inf, sharding, bases):
    cfg = _CONFIG
    T = len(params)
    numels = [p.numel() for p in params]
    if tidx is not None:
        hkeys = [_hash.tensor_key(seed, j) for j in tidx]
    else:
        hkeys = [0] * T
    ttab = _tensor_table(params, grads, ms, vs, steps, hkeys, bases, device)
    plan, plan_key = _plan(numels, selection, alpha, block_size, device, sharding)
    work = _workspace(plan_key, plan, params, device, 1 if sharding is None else sharding.world)
    ws = work.ws

    has_inf = found_inf is not None
    has_scale = grad_scale is not None
    inf_arg = found_inf if has_inf else ws
    scale_arg = grad_scale if has_scale else ws
    use_hc = hash_counter is not None
    hc = int(hash_counter) & _hash.MASK32 if use_hc else 0
    if weight_decay == 0.0 or lr == 0.0:
        decay_mode = DECAY_NONE
    elif mask_weight_decay or selection == "all":
        decay_mode = DECAY_MASKED
    else:
        decay_mode = DECAY_ALL
    decay = 1.0 - lr * weight_decay
    ptrs_aligned = all(x.data_ptr() % 16 == 0 for lst in (params, grads, ms, vs) for x in lst)
    aligned = ptrs_aligned and plan.starts_aligned
    pdt = _tl_dtype(dtype)
    sec = 32 // params[0].element_size()  # entries per 32-byte sector of p
    nw = cfg.num_warps

    b1 = _split(beta1)
    b2 = _split(beta2)
    lrs = _split(lr)
    prologue_kernel[(triton.cdiv(T, 1024),)](
        ttab, T, ws, inf_arg, b1[0], b1[1], b2[0], b2[1], lrs[0], lrs[1],
        HAS_INF=has_inf, BLOCK=1024, num_warps=4)

    common = dict(PDT=pdt, MDT=_tl_dtype(mdtype), HAS_INF=has_inf, HAS_SCALE=has_scale, USE_HCOUNTER=use_hc, HUGE=plan.huge)
    omb1, omb2 = 1.0 - beta1, 1.0 - beta2

    if selection in ("all", "random"):
        if plan.n_chunks:
            dense_step_kernel[(plan.n_chunks,)](
                ttab, T, plan.ctab, plan.n_chunks, ws, inf_arg, scale_arg,
                beta1, omb1, beta2, omb2, eps, decay, hc, _hash.threshold(alpha),
                MODE=0 if selection == "all" else 1, DECAY=decay_mode, ALIGNED=aligned,
                SEC=sec, CHUNK=cfg.chunk, num_warps=nw, **common)
        return

    key_mode = _KEY_MODE[selection]
    float_key = key_mode != KEY_HASH
    keybits, idxb = (32, 31) if key_mode == KEY_HASH else (31, 32)
    for loc in plan.locals_:
        local_step_kernel[(triton.cdiv(loc.n_seg, loc.rows),)](
            ttab, T, loc.ltab, loc.n_seg, ws, inf_arg, scale_arg,
            beta1, omb1, beta2, omb2, eps, decay, hc,
            KEY_MODE=key_mode, DECAY=decay_mode, KEYBITS=keybits, ROWS=loc.rows, BB=loc.bb,
            num_warps=cfg.local_num_warps, **common)
    if not plan.n_seg:
        return

    S, C = plan.n_seg, plan.n_chunks
    programs = _programs(C, device)
    per_program = triton.cdiv(C, programs)
    programs = triton.cdiv(C, per_program) if C else 0
    window = dict(FRAC=cfg.window_frac, NB_LOG2=cfg.window_bins_log2)
    # the window bin fixes the composite bits from idxb + (key bits below the bin) upwards
    open_bits = idxb + (23 - cfg.window_frac if float_key else 32 - cfg.window_bins_log2)
    top_shift = ((open_bits - 1) // 8) * 8
    rank = 0 if sharding is None else sharding.rank
    if programs:
        moments_window_kernel[(programs,)](
            ttab, T, plan.ctab, C, per_program, ws, work.sst, S, work.hist, work.zcount, inf_arg, scale_arg,
            beta1, omb1, beta2, omb2, hc,
            KEY_MODE=key_mode, ALIGNED=aligned, CHUNK=cfg.chunk, num_warps=nw, **window, **common)
    if sharding is not None:
        _all_reduce(work.hist, sharding)
    window_select_kernel[(S,)](
        work.hist, work.sst, S, plan.stab, work.zcount, work.ztotal, rank, work.ztotal.shape[0], inf_arg,
        HAS_INF=has_inf, FLOAT_KEY=float_key, IDXB=idxb, TOP_SHIFT=top_shift, SCAN=1024,
        num_warps=cfg.select_num_warps, **window)
    if sharding is None:
        exact_select_kernel[(S,)](
            ttab, T, ws, work.sst, S, plan.stab, inf_arg, scale_arg, hc,
            KEY_MODE=key_mode, IDXB=idxb, CHUNK=cfg.chunk, num_warps=nw, **common)
    else:
        # the zeros on the ranks before this one (each rank wrote its own row and zeroed the
        # others), then the fallback level by level across the ranks
        _all_reduce(work.ztotal, sharding)
        torch.sum(work.ztotal[:rank], dim=0, out=work.sst[S_ZBASE_ROW])
        for shift in range(56, -1, -8):
            if programs:
                data_level_kernel[(programs,)](
                    ttab, T, plan.ctab, C, per_program, ws, work.sst, S, work.levels, inf_arg, scale_arg, hc,
                    shift, KEY_MODE=key_mode, IDXB=idxb, CHUNK=cfg.chunk, num_warps=nw, **common)
            _all_reduce(work.levels, sharding)
            level_select_kernel[(S,)](work.levels, work.sst, S, inf_arg, shift, MODE=MODE_EXACT.value,
                                      HAS_INF=has_inf, num_warps=cfg.select_num_warps)
    if programs:
        apply_compact_kernel[(programs,)](
            ttab, T, plan.ctab, C, per_program, ws, work.sst, S, plan.stab, work.cand, work.zcount,
            inf_arg, scale_arg, eps, decay, hc,
            KEY_MODE=key_mode, DECAY=decay_mode, ALIGNED=aligned, IDXB=idxb, SEC=sec, CHUNK=cfg.chunk,
            num_warps=nw, **window, **common)
    if sharding is not None:  # the candidates' threshold across the ranks
        for shift in range(top_shift, -1, -8):
            cand_level_kernel[(S,)](work.sst, S, plan.stab, work.cand, work.levels, inf_arg, shift,
                                    HAS_INF=has_inf, TILE=cfg.resolve_tile, num_warps=cfg.select_num_warps)
            _all_reduce(work.levels, sharding)
            level_select_kernel[(S,)](work.levels, work.sst, S, inf_arg, shift, MODE=MODE_WINDOW.value,
                                      HAS_INF=has_inf, num_warps=cfg.select_num_warps)
    if _debug_capture is not None:  # tests: the mode each segment took
        _debug_capture.append(dict(sst=work.sst.clone(), stab=plan.stab))
    resolve_kernel[(S,)](
        ttab, T, ws, work.sst, S, plan.stab, work.cand, inf_arg, eps, decay,
        PDT=pdt, MDT=_tl_dtype(mdtype), HAS_INF=has_inf, DECAY=decay_mode, FLOAT_KEY=float_key, IDXB=idxb,
        TOP_SHIFT=top_shift, TILE=cfg.resolve_tile, THR_KNOWN=sharding is not None,
        num_warps=cfg.select_num_warps, **window)


def _all_reduce(tensor: torch.Tensor, sharding: _Sharding) -> None:
    """Sum over the group, ordered on the current stream (no host synchronisation)."""
    import torch.distributed as dist

    dist.all_reduce(tensor, group=sharding.group)
