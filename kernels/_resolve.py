"""The last launch of the exact top-k path: resolve the candidates, update them, move the window.

One program per segment. In ``MODE_WINDOW`` it radix-selects the r-th largest composite key
among the boundary bin's candidates (8-bit digits from the highest one the bin leaves open,
after the digits it fixes, which the window select stored;
the key digits, then the index digits only under exact ties), then updates the candidates at
or above it (and, when every entry decays, decays all of them: pass 2 left them alone). Then
the segment's window is centred on this step's threshold for the next step. For sharded
segments the threshold comes from ``_sharded``'s level-by-level selects (``THR_KNOWN``) and
this launch only updates the candidates and moves the window.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    G_COFF,
    G_START,
    G_TENSOR,
    MODE_DIGIT,
    MODE_EXACT,
    MODE_WINDOW,
    S_CCOUNT,
    S_CENTER,
    S_DSEL,
    S_MODE,
    S_PREFIX,
    S_R,
    S_THR,
    WS_BC2_SQRT,
    WS_STEP_SIZE,
    adam_update,
    as_param,
    candidate_histogram,
    radix_digit,
    skip_step,
    tensor_pointers,
    window_base,
)


@triton.jit
def resolve_kernel(
    ttab,
    T,
    ws,
    sst,
    S,
    stab,
    cand,
    found_inf_ptr,
    eps,
    decay,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    HAS_INF: tl.constexpr,
    DECAY: tl.constexpr,
    FLOAT_KEY: tl.constexpr,
    IDXB: tl.constexpr,
    FRAC: tl.constexpr,
    NB_LOG2: tl.constexpr,
    TOP_SHIFT: tl.constexpr,
    TILE: tl.constexpr,
    THR_KNOWN: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_INF):
        return
    s = tl.program_id(0)
    mode = tl.load(sst + S_MODE * S + s)
    NB: tl.constexpr = 1 << NB_LOG2
    if mode == MODE_WINDOW:
        count = tl.load(sst + S_CCOUNT * S + s)
        region = cand + tl.load(stab + G_COFF * S + s)
        lane = tl.arange(0, TILE)
        if THR_KNOWN:  # sharded: found level by level across the ranks (_sharded)
            thr = tl.load(sst + S_THR * S + s)
        else:
            r = tl.load(sst + S_R * S + s)
            prefix = tl.load(sst + S_PREFIX * S + s)  # the bits the window bin fixes (window select)
            shift = tl.zeros([], tl.int64) + TOP_SHIFT
            done = tl.zeros([], tl.int32)
            thr = tl.zeros([], tl.int64)
            while done == 0:
                r, prefix, found, key = radix_digit(
                    candidate_histogram(region, count, prefix, shift, TILE), r, prefix, shift
                )
                done = found.to(tl.int32)
                thr = tl.where(found, key, thr)
                shift = tl.where(found, shift, shift - 8)
            tl.store(sst + S_THR * S + s, thr)

        t = tl.load(stab + G_TENSOR * S + s)
        seg_start = tl.load(stab + G_START * S + s)
        p_ptr, _, m_ptr, v_ptr = tensor_pointers(ttab, T, t, PDT, MDT, False)
        step_size = tl.load(ws + WS_STEP_SIZE * T + t)
        bc2_sqrt = tl.load(ws + WS_BC2_SQRT * T + t)
        for j in range(0, count, TILE):
            cmask = j + lane < count
            comp = tl.load(region + j + lane, mask=cmask, other=0)
            sel = cmask & (comp >= thr)
            offs = seg_start + (((1 << IDXB) - 1) - (comp & ((1 << IDXB) - 1)))
            if DECAY == 2:
                pmask = cmask
            else:
                pmask = sel
            m = tl.load(m_ptr + offs, mask=sel, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=sel, other=0.0).to(tl.float32)
            p = tl.load(p_ptr + offs, mask=pmask, other=0.0).to(tl.float32)
            p = adam_update(p, m, v, step_size, bc2_sqrt, eps, decay, sel, DECAY)
            tl.store(p_ptr + offs, as_param(p, PDT), mask=pmask)
    if FLOAT_KEY:
        # the fine key of the threshold, for the next step's window
        center = tl.load(sst + S_CENTER * S + s)
        if (mode == MODE_WINDOW) | (mode == MODE_EXACT):
            center = tl.load(sst + S_THR * S + s) >> (IDXB + 23 - FRAC)
        elif mode == MODE_DIGIT:
            lowest = tl.load(sst + S_DSEL * S + s) + 1  # the lowest bin taken
            if (lowest >= 2) & (lowest <= NB - 2):
                center = window_base(sst, S, s, NB_LOG2) + lowest
        tl.store(sst + S_CENTER * S + s, center)
