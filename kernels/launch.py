"""Launchers: argument checks, device tables, per-step workspace and the launch sequence.

One call steps one parameter group. Tensors are grouped by parameter dtype (one launch
sequence per dtype present, at most three); within a group every launch covers all of its
tensors through int64 device tables (addresses, numels, chunk -> (tensor, offset) map), so the
number of launches does not grow with the number of tensors:

* ``all`` / ``random``: prologue + one fused pass (``_dense``).
* ``topk_*`` / ``random_exact``: prologue, then
  - segments of at most ``local_max`` entries (``block_size`` blocks, small tensors such as
    norms and biases): one fused pass that selects in registers (``_local``, one launch per
    power-of-two row width present);
  - longer segments: moments + first histogram (``_moments``), select, then one (refine,
    select) pair per further radix digit (8 more at 7-bit digits over the 63-bit key), each
    skipping finished segments, then the masked apply (``_apply``).

No host synchronisation: the step counters, bias corrections, thresholds and the GradScaler
skip flag stay on the device.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import triton

from maskopt import _hash

from ._apply import apply_kernel
from ._common import (
    DECAY_ALL, DECAY_MASKED, DECAY_NONE, KEY_GRADIENT, KEY_HASH, KEY_MOMENTUM, N_SROWS,
    N_WSROWS, prologue_kernel,
)
from ._dense import dense_step_kernel
from ._local import local_step_kernel
from ._moments import moments_hist_kernel
from ._select import cand_refine_kernel, refine_kernel, select_kernel

SELECTIONS = ("all", "topk_momentum", "topk_gradient", "random", "random_exact")
_PARAM_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_KEY_MODE = {"topk_momentum": KEY_MOMENTUM, "topk_gradient": KEY_GRADIENT, "random_exact": KEY_HASH}


@dataclass(frozen=True)
class KernelConfig:
    """Tuning knobs (tests shrink them to exercise multi-chunk and multi-level paths)."""

    chunk: int = 4096  # entries per program of the streaming kernels (power of two)
    local_max: int = 4096  # segments up to this many entries are selected in registers
    local_tile: int = 4096  # entries per program of the local kernel
    # Radix digit width. tl.histogram's cost grows with the bin count: on an H100 (TinyLlama
    # shapes, alpha 0.1) the MoFO step took 133 ms at 11 bits, 35 at 8 and 32 at 7
    # (benchmarks/tune_kernels.py, RESULTS.md), although narrower digits need more levels.
    hist_bits: int = 7
    compact: bool = True  # level 2 compacts the boundary bucket; later levels read only it
    cand_frac: float = 1 / 32  # candidate capacity per segment, as a share of its entries...
    cand_min: int = 256  # ...but at least this many (overflow falls back to reading the data)
    max_hist_bytes: int = 64 << 20  # histogram workspace target (digits narrow to 8 bits beyond it)
    num_warps: int = 8  # streaming kernels (chunk 4096: 16 entries per thread, no spills on sm_90)
    local_num_warps: int = 16  # local kernel (tile 4096: no spills on sm_90)
    select_num_warps: int = 4


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
    if not 1 <= new.hist_bits <= 12:
        raise ValueError(f"hist_bits must be in [1, 12], got {new.hist_bits}")
    _CONFIG = new
    _PLANS.clear()
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
    return type(dense_step_kernel).__name__ == "InterpretedFunction"


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
    stab: torch.Tensor | None  # int64 [N_GROWS, S]: k, candidate capacity, candidate offset
    n_seg: int
    ktab: torch.Tensor | None  # int64 [N_KROWS, K]: candidate chunks (segment, start)
    n_kchunks: int
    n_cand: int  # candidate buffer length
    levels: tuple  # ((shift, bits), ...) over the 63-bit composite key
    locals_: list
    starts_aligned: bool
    huge: bool


def _chunk_table(seg_tensor, seg_start, seg_len, chunk):
    """Split segments into chunks of at most ``chunk`` entries (vectorised)."""
    seg_tensor = torch.as_tensor(seg_tensor, dtype=torch.int64)
    seg_start = torch.as_tensor(seg_start, dtype=torch.int64)
    seg_len = torch.as_tensor(seg_len, dtype=torch.int64)
    nch = (seg_len + chunk - 1) // chunk
    total = int(nch.sum())
    seg = torch.repeat_interleave(torch.arange(len(nch), dtype=torch.int64), nch)
    first = torch.cumsum(nch, 0) - nch
    j = torch.arange(total, dtype=torch.int64) - first[seg]
    start = seg_start[seg] + j * chunk
    length = torch.minimum(torch.full_like(start, chunk), seg_len[seg] - j * chunk)
    return torch.stack([seg_tensor[seg], start, length, seg, seg_start[seg]]), total


def _levels(hist_bits: int) -> tuple:
    out, hi = [], 63
    while hi > 0:
        bits = min(hist_bits, hi)
        out.append((hi - bits, bits))
        hi -= bits
    return tuple(out)


def _build_plan(numels, selection, alpha, block_size, cfg, device) -> _Plan:
    huge = any(n > (1 << 32) for n in numels)
    if selection in ("all", "random"):
        ts = [i for i, n in enumerate(numels) if n > 0]
        ctab, total = _chunk_table(ts, [0] * len(ts), [numels[i] for i in ts], cfg.chunk)
        return _Plan(ctab.to(device), total, None, 0, None, 0, 0, (), [], True, huge)

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
    locals_ = []
    for bb in sorted(loc):
        rows = loc[bb]
        ltab = torch.tensor(rows, dtype=torch.int64).T.contiguous()
        locals_.append(_Local(ltab.to(device), len(rows), bb, max(1, cfg.local_tile // bb)))
    n_seg = len(g_t)
    ctab = stab = ktab = None
    total = n_k = n_cand = 0
    levels: tuple = ()
    if n_seg:
        ctab, total = _chunk_table(g_t, g_s, g_n, cfg.chunk)
        ctab = ctab.to(device)
        caps = [min(n, max(cfg.cand_min, math.ceil(n * cfg.cand_frac))) for n in g_n]
        coff = [0] * n_seg
        for i in range(1, n_seg):
            coff[i] = coff[i - 1] + caps[i - 1]
        n_cand = coff[-1] + caps[-1]
        stab = torch.tensor([g_k, caps, coff], dtype=torch.int64).to(device)
        kt, n_k = _chunk_table(list(range(n_seg)), [0] * n_seg, caps, cfg.chunk)
        ktab = torch.stack([kt[3], kt[1]]).contiguous().to(device)  # (segment, start)
        bits = cfg.hist_bits
        while bits > 8 and n_seg * (4 << bits) > cfg.max_hist_bytes:
            bits -= 1  # many segments (block_size > local_max): narrower digits, more levels
        levels = _levels(bits)
    aligned = all(s % 16 == 0 for s in g_s)
    return _Plan(ctab, total, stab, n_seg, ktab, n_k, n_cand, levels, locals_, aligned, huge)


_PLANS: OrderedDict = OrderedDict()
_MAX_PLANS = 64


def _plan(numels, selection, alpha, block_size, device) -> _Plan:
    cfg = _CONFIG
    kind = selection if selection not in ("all", "random") else "dense"
    key = (str(device), tuple(numels), kind,
           None if kind == "dense" else float(alpha),
           block_size if kind.startswith("topk") else None)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _build_plan(numels, selection, alpha, block_size, cfg, device)
        _PLANS[key] = plan
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


# ---------------------------------------------------------------------------------------
# tensor tables (addresses change whenever grads are reallocated: rebuilt, small LRU)

_debug_capture: list | None = None  # set to a list to record each step's segment state

_TTABS: OrderedDict = OrderedDict()
_MAX_TTABS = 16


def _tensor_table(params, grads, ms, vs, steps, hkeys, device) -> torch.Tensor:
    rows = (
        tuple(p.data_ptr() for p in params),
        tuple(g.data_ptr() for g in grads),
        tuple(m.data_ptr() for m in ms),
        tuple(v.data_ptr() for v in vs),
        tuple(s.data_ptr() for s in steps),
        tuple(p.numel() for p in params),
        tuple(hkeys),
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
        if m.dtype != torch.float32 or v.dtype != torch.float32:
            raise TypeError(f"fused_adam_step_: exp_avg/exp_avg_sq {i} must be float32, "
                            f"got {m.dtype}/{v.dtype}")
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
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


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
) -> None:
    """One masked-AdamW step of one parameter group (docs/semantics.md), in place.

    Args:
        params, grads, exp_avgs, exp_avg_sqs, state_steps: per-tensor lists on one CUDA device
            (or CPU under TRITON_INTERPRET=1); contiguous; float32 moments and step counters.
        policy: the ``maskopt.policy.SelectionPolicy`` shared by all the tensors.
        lr, beta1, beta2, eps, weight_decay, mask_weight_decay: the AdamW hyperparameters.
        tensor_indices: each tensor's index in its optimizer (keys the random masks).
        grad_scale, found_inf: GradScaler's one-element tensors, or None.
    """
    if len(params) == 0:
        return
    selection = "all" if policy.moves_all else policy.kind
    alpha, block_size, seed, hash_counter = policy.alpha, policy.block_size, policy.seed, policy.counter
    device = _check(params, grads, exp_avgs, exp_avg_sqs, state_steps, selection, alpha,
                    block_size, tensor_indices, grad_scale, found_inf)
    check_device(device)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    # Triton launches on the current CUDA device: make it the tensors' device
    guard = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    with guard:
        _step_dtype_groups(by_dtype, params, grads, exp_avgs, exp_avg_sqs, state_steps, tensor_indices,
                           device, selection=selection, alpha=alpha, block_size=block_size, lr=lr,
                           beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                           mask_weight_decay=mask_weight_decay, seed=seed, hash_counter=hash_counter,
                           grad_scale=grad_scale, found_inf=found_inf)


def _step_dtype_groups(by_dtype, params, grads, exp_avgs, exp_avg_sqs, state_steps, tensor_indices, device,
                       *, selection, alpha, block_size, lr, beta1, beta2, eps, weight_decay,
                       mask_weight_decay, seed, hash_counter, grad_scale, found_inf):
    for dtype, idx in by_dtype.items():
        _step_group(
            [params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx], [state_steps[i] for i in idx],
            [tensor_indices[i] for i in idx] if selection in ("random", "random_exact") else None,
            dtype, device, selection=selection, alpha=float(alpha), block_size=block_size,
            lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
            weight_decay=float(weight_decay), mask_weight_decay=bool(mask_weight_decay),
            seed=int(seed), hash_counter=hash_counter, grad_scale=grad_scale, found_inf=found_inf)


def _tl_dtype(dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _step_group(params, grads, ms, vs, steps, tidx, dtype, device, *, selection, alpha, block_size,
                lr, beta1, beta2, eps, weight_decay, mask_weight_decay, seed, hash_counter,
                grad_scale, found_inf):
    cfg = _CONFIG
    T = len(params)
    numels = [p.numel() for p in params]
    if tidx is not None:
        hkeys = [_hash.tensor_key(seed, j) for j in tidx]
    else:
        hkeys = [0] * T
    ttab = _tensor_table(params, grads, ms, vs, steps, hkeys, device)
    plan = _plan(numels, selection, alpha, block_size, device)
    ws = torch.empty((N_WSROWS, T), dtype=torch.float32, device=device)

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
    nw = cfg.num_warps

    b1 = _split(beta1)
    b2 = _split(beta2)
    lrs = _split(lr)
    prologue_kernel[(triton.cdiv(T, 1024),)](
        ttab, T, ws, inf_arg, b1[0], b1[1], b2[0], b2[1], lrs[0], lrs[1],
        HAS_INF=has_inf, BLOCK=1024, num_warps=4)

    common = dict(PDT=pdt, HAS_INF=has_inf, HAS_SCALE=has_scale, USE_HCOUNTER=use_hc, HUGE=plan.huge)
    omb1, omb2 = 1.0 - beta1, 1.0 - beta2

    if selection in ("all", "random"):
        if plan.n_chunks:
            dense_step_kernel[(plan.n_chunks,)](
                ttab, T, plan.ctab, plan.n_chunks, ws, inf_arg, scale_arg,
                beta1, omb1, beta2, omb2, eps, decay, hc, _hash.threshold(alpha),
                MODE=0 if selection == "all" else 1, DECAY=decay_mode, ALIGNED=aligned,
                CHUNK=cfg.chunk, num_warps=nw, **common)
        return

    key_mode = _KEY_MODE[selection]
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
    shift1, bits1 = plan.levels[0]
    nbins_max = 1 << bits1
    hist = torch.zeros((S, nbins_max), dtype=torch.int32, device=device)
    sst = torch.zeros((N_SROWS, S), dtype=torch.int64, device=device)
    compact = cfg.compact and len(plan.levels) > 2
    cand = torch.empty(plan.n_cand if compact else 1, dtype=torch.int64, device=device)
    moments_hist_kernel[(C,)](
        ttab, T, plan.ctab, C, ws, hist, inf_arg, scale_arg,
        beta1, omb1, beta2, omb2, hc,
        KEY_MODE=key_mode, ALIGNED=aligned, KEY_SHIFT=shift1 - idxb, BITS=bits1,
        CHUNK=cfg.chunk, num_warps=nw, **common)
    select_kernel[(S,)](hist, sst, S, plan.stab, inf_arg, HAS_INF=has_inf, FIRST=True,
                        SHIFT=shift1, BITS=bits1, num_warps=cfg.select_num_warps)
    for level, (shift, bits) in enumerate(plan.levels[1:], start=2):
        if compact and level > 2:
            cand_refine_kernel[(plan.n_kchunks,)](
                plan.ktab, plan.n_kchunks, hist, sst, S, plan.stab, cand, inf_arg,
                HAS_INF=has_inf, SHIFT=shift, BITS=bits, CHUNK=cfg.chunk, num_warps=nw)
        refine_kernel[(C,)](
            ttab, T, plan.ctab, C, ws, hist, sst, S, plan.stab, cand, inf_arg, scale_arg, hc,
            KEY_MODE=key_mode, ALIGNED=aligned, PHASE=0 if not compact else (1 if level == 2 else 2),
            IDXB=idxb, SHIFT=shift, BITS=bits, CHUNK=cfg.chunk, num_warps=nw, **common)
        select_kernel[(S,)](hist, sst, S, plan.stab, inf_arg, HAS_INF=has_inf, FIRST=False,
                            SHIFT=shift, BITS=bits, num_warps=cfg.select_num_warps)
    if _debug_capture is not None:  # tests: which radix path each segment took
        _debug_capture.append(dict(sst=sst, stab=plan.stab, compact=compact))
    apply_kernel[(C,)](
        ttab, T, plan.ctab, C, ws, sst, S, inf_arg, scale_arg, eps, decay, hc,
        KEY_MODE=key_mode, DECAY=decay_mode, ALIGNED=aligned, IDXB=idxb, CHUNK=cfg.chunk,
        num_warps=nw, **common)
