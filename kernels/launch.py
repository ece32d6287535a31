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

import os
import struct
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import triton

from maskopt import _hash
from maskopt._graphs import stream_capturing

from ._apply import apply_compact_kernel
from ._common import (
    DECAY_ALL,
    DECAY_MASKED,
    DECAY_NONE,
    KEY_GRADIENT,
    KEY_HASH,
    KEY_MOMENTUM,
    MODE_EXACT,
    MODE_WINDOW,
    S_ZBASE,
    prologue_kernel,
)
from ._dense import dense_step_kernel
from ._fallback import exact_select_kernel
from ._levels import cand_level_kernel, cand_update_kernel, data_level_kernel, level_select_kernel
from ._local import local_step_kernel
from ._resolve import resolve_kernel
from ._window import moments_window_kernel, window_select_kernel
from .plan import (
    CAPTURE_REFUSAL,
    PLANS,
    Sharding,
    find_workspace,
    persistent_grid,
    plan_cache_key,
    plan_for,
    reset_accumulators,
    sharding_of,
    tensor_table,
    workspace_for,
)

S_ZBASE_ROW = S_ZBASE.value
SELECTIONS = ("all", "topk_momentum", "topk_gradient", "random", "random_exact")
_MOMENT_DTYPES = (torch.float32, torch.bfloat16)
_PARAM_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_KEY_MODE = {"topk_momentum": KEY_MOMENTUM, "topk_gradient": KEY_GRADIENT, "random_exact": KEY_HASH}
# Compile options of every launch. No contraction into fused multiply-adds: each float
# operation is rounded on its own, as under the interpreter, so the interpreter's bits are the
# GPU's (the kernels also use IEEE division and square root; docs/kernels.md).
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)


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
    # streaming kernels: chunk 4096 is 8 entries per thread, where pass 2 fits in 128 registers,
    # 16 warps per SM (at 8 warps, 16 entries per thread, it needs about 250: 8 warps per SM)
    num_warps: int = 16
    local_num_warps: int = 16  # local kernel (tile 4096: 8 entries per thread, 128 registers)
    select_num_warps: int = 4
    resolve_tile: int = 1024  # candidates per iteration of the resolve (2048 spills on sm_90)
    # A call holding a segment of at least this many entries spreads its fallback and
    # candidate selects over many programs (_levels: about 30 launches, most of which exit at
    # once) instead of one program per segment, which would read the segment alone on one SM
    # while the GPU idles; below it, the two one-program launches cost less than the extra
    # launches. Sharded calls always spread.
    spread_min: int = 1 << 20
    cand_block: int = 16384  # candidates per block of the spread candidate kernels


_CONFIG = KernelConfig()


def get_config() -> KernelConfig:
    return _CONFIG


def set_config(**changes) -> KernelConfig:
    """Replace config fields; returns the previous config."""
    global _CONFIG
    old = _CONFIG
    new = replace(old, **changes)
    for name in ("chunk", "local_tile", "resolve_tile", "cand_block"):
        v = getattr(new, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if new.cand_block < new.resolve_tile:
        raise ValueError(f"cand_block must be >= resolve_tile ({new.resolve_tile}), got {new.cand_block}")
    if not 0 <= new.window_frac <= 7 or not 4 <= new.window_bins_log2 <= 11:
        raise ValueError(
            f"window_frac must be in [0, 7] and window_bins_log2 in [4, 11], got "
            f"{new.window_frac} and {new.window_bins_log2}"
        )
    _CONFIG = new
    # Plans are keyed by shapes only; workspaces by their config too, so they stay with
    # their optimizer state (a captured step points into them).
    PLANS.clear()
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
                "compiled kernels (unset TRITON_INTERPRET before importing maskopt.kernels)"
            )
        return
    if device.type == "cpu":
        if not _kernels_interpreted():
            raise RuntimeError(
                "the fused (Triton) path runs on CPU only under the Triton interpreter: set "
                "TRITON_INTERPRET=1 before maskopt.kernels is first used, or use fused=False"
            )
        return
    raise RuntimeError(
        f"the fused (Triton) path supports CUDA (and CPU under TRITON_INTERPRET=1), "
        f"not {device.type!r}; use fused=False"
    )


_debug_capture: list | None = None  # set to a list to record each step's segment state


# ---------------------------------------------------------------------------------------
# argument checks


def _check(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    state_steps,
    selection,
    tensor_indices,
    grad_scale,
    found_inf,
    shards,
):
    n = len(params)
    if shards is not None and len(shards) != n:
        raise ValueError(f"fused_adam_step_: len(shards)={len(shards)} != len(params)={n}")
    for name, lst in (
        ("grads", grads),
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("state_steps", state_steps),
    ):
        if len(lst) != n:
            raise ValueError(f"fused_adam_step_: len({name})={len(lst)} != len(params)={n}")
    if selection not in SELECTIONS:  # (SelectionPolicy has checked alpha and block_size)
        raise ValueError(f"fused_adam_step_: selection must be one of {SELECTIONS}, got {selection!r}")
    if selection in ("random", "random_exact") and len(tensor_indices) != n:
        raise ValueError(f"fused_adam_step_: len(tensor_indices)={len(tensor_indices)} != len(params)={n}")
    device = params[0].device
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True)):
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(
                f"fused_adam_step_: param {i} has dtype {p.dtype}; the fused path supports "
                f"float32, bfloat16 and float16 (use fused=False)"
            )
        if g.is_sparse or g.layout != torch.strided:
            raise TypeError(f"fused_adam_step_: grad {i} is sparse; the fused path needs dense gradients")
        if g.dtype != p.dtype:
            raise TypeError(f"fused_adam_step_: grad {i} has dtype {g.dtype}, param has {p.dtype}")
        if m.dtype not in _MOMENT_DTYPES or v.dtype != m.dtype:
            raise TypeError(
                f"fused_adam_step_: exp_avg/exp_avg_sq {i} must both be float32 or both "
                f"bfloat16, got {m.dtype}/{v.dtype}"
            )
        if s.dtype != torch.float32 or s.numel() != 1:
            raise TypeError(
                f"fused_adam_step_: state_steps[{i}] must be a float32 scalar tensor, "
                f"got dtype {s.dtype} with {s.numel()} elements"
            )
        for name, x in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v), ("step", s)):
            if x.device != device:
                raise ValueError(
                    f"fused_adam_step_: {name} {i} is on {x.device}, expected {device} "
                    f"(one launch covers tensors of one device)"
                )
        for name, x in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if x.shape != p.shape:
                raise ValueError(
                    f"fused_adam_step_: {name} {i} has shape {tuple(x.shape)}, param has {tuple(p.shape)}"
                )
        for name, x in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if not x.is_contiguous():
                raise ValueError(
                    f"fused_adam_step_: {name} {i} is not contiguous; the fused path "
                    f"needs contiguous tensors (call .contiguous() or use fused=False)"
                )
    for name, x in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if x is not None and (x.device != device or x.numel() != 1):
            raise ValueError(
                f"fused_adam_step_: {name} must be a one-element tensor on {device}, "
                f"got {x.numel()} elements on {x.device}"
            )
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
    device = _check(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        selection,
        tensor_indices,
        grad_scale,
        found_inf,
        shards,
    )
    check_device(device)
    # Shards hash their global indices; a whole-tensor selection is taken across the ranks,
    # while blocks lie inside one shard (the optimizer checks it) and are selected locally.
    bases = [0] * len(params) if shards is None else [0 if s is None else int(s.offset) for s in shards]
    across = selection in ("topk_momentum", "topk_gradient", "random_exact") and not (
        block_size is not None and selection.startswith("topk")
    )
    sharding = sharding_of(params, shards) if across else None
    by_dtype: dict[tuple, list[int]] = {}
    for i, (p, m) in enumerate(zip(params, exp_avgs, strict=True)):
        by_dtype.setdefault((p.dtype, m.dtype), []).append(i)
    # Triton launches on the current CUDA device: make it the tensors' device
    guard = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    with guard:
        _step_dtype_groups(
            by_dtype,
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            tensor_indices,
            device,
            selection=selection,
            alpha=alpha,
            block_size=block_size,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            mask_weight_decay=mask_weight_decay,
            seed=seed,
            hash_counter=hash_counter,
            grad_scale=grad_scale,
            found_inf=found_inf,
            sharding=sharding,
            bases=bases,
        )


def _step_dtype_groups(
    by_dtype,
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    state_steps,
    tensor_indices,
    device,
    *,
    selection,
    alpha,
    block_size,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    mask_weight_decay,
    seed,
    hash_counter,
    grad_scale,
    found_inf,
    sharding,
    bases,
):
    for (dtype, mdtype), idx in by_dtype.items():
        part = (
            None
            if sharding is None
            else replace(
                sharding,
                numels=tuple(sharding.numels[i] for i in idx),
                offsets=tuple(sharding.offsets[i] for i in idx),
            )
        )
        _step_group(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [state_steps[i] for i in idx],
            [tensor_indices[i] for i in idx] if selection in ("random", "random_exact") else None,
            dtype,
            mdtype,
            device,
            selection=selection,
            alpha=float(alpha),
            block_size=block_size,
            lr=float(lr),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(eps),
            weight_decay=float(weight_decay),
            mask_weight_decay=bool(mask_weight_decay),
            seed=int(seed),
            hash_counter=hash_counter,
            grad_scale=grad_scale,
            found_inf=found_inf,
            sharding=part,
            bases=[bases[i] for i in idx],
        )


def _tl_dtype(dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _step_group(
    params,
    grads,
    ms,
    vs,
    steps,
    tidx,
    dtype,
    mdtype,
    device,
    *,
    selection,
    alpha,
    block_size,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    mask_weight_decay,
    seed,
    hash_counter,
    grad_scale,
    found_inf,
    sharding,
    bases,
):
    cfg = _CONFIG
    T = len(params)
    numels = [p.numel() for p in params]
    if tidx is not None:
        hkeys = [_hash.tensor_key(seed, j) for j in tidx]
    else:
        hkeys = [0] * T
    # Everything a launch points to is the workspace's (plan, tables, buffers), built before
    # the first launch; under CUDA graph capture nothing may be built or copied from the host.
    capturing = stream_capturing()
    plan_key = plan_cache_key(numels, selection, alpha, block_size, device, sharding)
    work = find_workspace(plan_key, params, steps, cfg)
    if work is None:
        if capturing:
            raise RuntimeError(
                CAPTURE_REFUSAL.format(
                    what="these tensors have no workspace yet (their first fused step, or new "
                    "shapes, parameters or kernel config)"
                )
            )
        plan, _ = plan_for(numels, selection, alpha, block_size, device, cfg, sharding)
        work = workspace_for(
            plan_key, plan, params, steps, device, cfg, 1 if sharding is None else sharding.world
        )
    plan = work.plan
    assert plan is not None  # workspace_for sets it
    ttab = tensor_table(work, params, grads, ms, vs, steps, hkeys, bases, capturing)
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
    pdt, mdt = _tl_dtype(dtype), _tl_dtype(mdtype)
    sec = 32 // params[0].element_size()  # entries per 32-byte sector of p
    nw = cfg.num_warps

    b1 = _split(beta1)
    b2 = _split(beta2)
    lrs = _split(lr)
    prologue_kernel[(triton.cdiv(T, 1024),)](
        ttab,
        T,
        ws,
        inf_arg,
        b1[0],
        b1[1],
        b2[0],
        b2[1],
        lrs[0],
        lrs[1],
        HAS_INF=has_inf,
        BLOCK=1024,
        num_warps=4,
        **LAUNCH_OPTIONS,
    )

    common = dict(PDT=pdt, MDT=mdt, HAS_INF=has_inf, HAS_SCALE=has_scale, USE_HCOUNTER=use_hc, HUGE=plan.huge)
    omb1, omb2 = 1.0 - beta1, 1.0 - beta2

    if selection in ("all", "random"):
        if plan.n_chunks:
            dense_step_kernel[(plan.n_chunks,)](
                ttab,
                T,
                plan.ctab,
                plan.n_chunks,
                ws,
                inf_arg,
                scale_arg,
                beta1,
                omb1,
                beta2,
                omb2,
                eps,
                decay,
                hc,
                _hash.threshold(alpha),
                MODE=0 if selection == "all" else 1,
                DECAY=decay_mode,
                ALIGNED=aligned,
                SEC=sec,
                CHUNK=cfg.chunk,
                num_warps=nw,
                **LAUNCH_OPTIONS,
                **common,
            )
        return

    key_mode = _KEY_MODE[selection]
    float_key = key_mode != KEY_HASH
    keybits, idxb = (32, 31) if key_mode == KEY_HASH else (31, 32)
    for loc in plan.locals_:
        local_step_kernel[(triton.cdiv(loc.n_seg, loc.rows),)](
            ttab,
            T,
            loc.ltab,
            loc.n_seg,
            ws,
            inf_arg,
            scale_arg,
            beta1,
            omb1,
            beta2,
            omb2,
            eps,
            decay,
            hc,
            KEY_MODE=key_mode,
            DECAY=decay_mode,
            KEYBITS=keybits,
            ROWS=loc.rows,
            BB=loc.bb,
            num_warps=cfg.local_num_warps,
            **LAUNCH_OPTIONS,
            **common,
        )
    if not plan.n_seg:
        return

    S, C = plan.n_seg, plan.n_chunks
    programs, per_program = persistent_grid(C, device, cfg)
    window = dict(FRAC=cfg.window_frac, NB_LOG2=cfg.window_bins_log2)
    # the window bin fixes the composite bits from idxb + (key bits below the bin) upwards
    open_bits = idxb + (23 - cfg.window_frac if float_key else 32 - cfg.window_bins_log2)
    top_shift = ((open_bits - 1) // 8) * 8
    rank = 0 if sharding is None else sharding.rank
    if work.dirty:  # an earlier step stopped between pass 1 and the resolve
        reset_accumulators(work)
    work.dirty = True  # until the resolve returns
    if programs:
        moments_window_kernel[(programs,)](
            ttab,
            T,
            plan.ctab,
            C,
            per_program,
            ws,
            work.sst,
            S,
            work.hist,
            work.zcount,
            inf_arg,
            scale_arg,
            beta1,
            omb1,
            beta2,
            omb2,
            hc,
            KEY_MODE=key_mode,
            ALIGNED=aligned,
            CHUNK=cfg.chunk,
            num_warps=nw,
            **LAUNCH_OPTIONS,
            **window,
            **common,
        )
    if sharding is not None:
        # each rank compacts its own boundary-bin entries: the capacity test needs the largest
        # count on one rank, the selection the sum
        work.hist_max.copy_(work.hist)
        _all_reduce(work.hist_max, sharding, op="max")
        _all_reduce(work.hist, sharding)
    window_select_kernel[(S,)](
        work.hist,
        work.hist if sharding is None else work.hist_max,
        work.sst,
        S,
        plan.stab,
        work.zcount,
        work.ztotal,
        rank,
        work.ztotal.shape[0],
        inf_arg,
        HAS_INF=has_inf,
        FLOAT_KEY=float_key,
        IDXB=idxb,
        TOP_SHIFT=top_shift,
        SCAN=1024,
        SHARDED=sharding is not None,
        num_warps=cfg.select_num_warps,
        **LAUNCH_OPTIONS,
        **window,
    )

    def select_level(shift: int, mode: int) -> None:
        """The digit at ``shift`` of each open segment of ``mode`` from its level histogram
        (summed over the ranks first when sharded)."""
        if sharding is not None:
            _all_reduce(work.levels, sharding)
        level_select_kernel[(S,)](
            work.levels,
            work.sst,
            S,
            inf_arg,
            shift,
            MODE=mode,
            HAS_INF=has_inf,
            num_warps=cfg.select_num_warps,
            **LAUNCH_OPTIONS,
        )

    if not plan.spread:
        exact_select_kernel[(S,)](
            ttab,
            T,
            ws,
            work.sst,
            S,
            plan.stab,
            inf_arg,
            scale_arg,
            hc,
            KEY_MODE=key_mode,
            IDXB=idxb,
            CHUNK=cfg.chunk,
            num_warps=nw,
            **LAUNCH_OPTIONS,
            **common,
        )
    else:
        if sharding is not None:
            # the zeros on the ranks before this one (each rank wrote its own row and zeroed
            # the others); then the fallback level by level (across the ranks)
            _all_reduce(work.ztotal, sharding)
            torch.sum(work.ztotal[:rank], dim=0, out=work.sst[S_ZBASE_ROW])
        for shift in range(56, -1, -8):
            if programs:
                data_level_kernel[(programs,)](
                    ttab,
                    T,
                    plan.ctab,
                    C,
                    per_program,
                    ws,
                    work.sst,
                    S,
                    work.levels,
                    inf_arg,
                    scale_arg,
                    hc,
                    shift,
                    KEY_MODE=key_mode,
                    IDXB=idxb,
                    CHUNK=cfg.chunk,
                    num_warps=nw,
                    **LAUNCH_OPTIONS,
                    **common,
                )
            select_level(shift, MODE_EXACT.value)
    if programs:
        apply_compact_kernel[(programs,)](
            ttab,
            T,
            plan.ctab,
            C,
            per_program,
            ws,
            work.sst,
            S,
            plan.stab,
            work.cand,
            work.zcount,
            inf_arg,
            scale_arg,
            eps,
            decay,
            hc,
            KEY_MODE=key_mode,
            DECAY=decay_mode,
            ALIGNED=aligned,
            IDXB=idxb,
            SEC=sec,
            CHUNK=cfg.chunk,
            num_warps=nw,
            **LAUNCH_OPTIONS,
            **window,
            **common,
        )
    if plan.spread:  # the candidates' threshold (across the ranks), then their update
        B = plan.n_blocks
        b_programs, b_per_program = persistent_grid(B, device, cfg)
        blocks = dict(TILE=cfg.resolve_tile, BLOCK=cfg.cand_block)
        for shift in range(top_shift, -1, -8):
            cand_level_kernel[(b_programs,)](
                work.sst,
                S,
                plan.stab,
                plan.btab,
                B,
                b_per_program,
                work.cand,
                work.levels,
                inf_arg,
                shift,
                HAS_INF=has_inf,
                num_warps=cfg.select_num_warps,
                **blocks,
                **LAUNCH_OPTIONS,
            )
            select_level(shift, MODE_WINDOW.value)
        cand_update_kernel[(b_programs,)](
            ttab,
            T,
            ws,
            work.sst,
            S,
            plan.stab,
            plan.btab,
            B,
            b_per_program,
            work.cand,
            inf_arg,
            eps,
            decay,
            PDT=pdt,
            MDT=mdt,
            HAS_INF=has_inf,
            DECAY=decay_mode,
            IDXB=idxb,
            num_warps=cfg.select_num_warps,
            **blocks,
            **LAUNCH_OPTIONS,
        )
    if _debug_capture is not None:  # tests: the mode each segment took
        _debug_capture.append(dict(sst=work.sst.clone(), stab=plan.stab))
    resolve_kernel[(S,)](
        ttab,
        T,
        ws,
        work.sst,
        S,
        plan.stab,
        work.cand,
        inf_arg,
        eps,
        decay,
        PDT=pdt,
        MDT=mdt,
        HAS_INF=has_inf,
        DECAY=decay_mode,
        FLOAT_KEY=float_key,
        IDXB=idxb,
        TOP_SHIFT=top_shift,
        TILE=cfg.resolve_tile,
        LEVELS=plan.spread,
        num_warps=cfg.select_num_warps,
        **LAUNCH_OPTIONS,
        **window,
    )
    work.dirty = False


def _all_reduce(tensor: torch.Tensor, sharding: Sharding, op: str = "sum") -> None:
    """Sum (or, ``op="max"``, maximum) over the group, ordered on the current stream (no host
    synchronisation)."""
    import torch.distributed as dist

    reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    dist.all_reduce(tensor, op=reduce_op, group=sharding.group)
