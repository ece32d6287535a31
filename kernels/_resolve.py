"""The last launch of the exact top-k path: resolve the candidates, update them, move the window.

One program per segment. In ``MODE_WINDOW`` it radix-selects the r-th largest composite key
among the boundary bin's candidates (8-bit digits from the highest one the bin leaves open,
after the digits it fixes, which the window select stored; the key digits, then the index
digits only under exact ties), then updates the candidates at or above it (and, when every
entry decays, decays all of them: pass 2 left them alone). Then the segment's window is
centred on this step's threshold for the next step. When the call's selects are spread over
many programs (``LEVELS``: long or sharded segments, ``_levels``), the threshold and the
candidates' update are already done and this launch only moves the window.
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
    candidate_histogram,
    radix_digit,
    skip_step,
    update_candidates,
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
    LEVELS: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_INF):
        return
    s = tl.program_id(0)
    mode = tl.load(sst + S_MODE * S + s)
    NB: tl.constexpr = 1 << NB_LOG2
    if not LEVELS:  # else _levels found the threshold and updated the candidates
        if mode == MODE_WINDOW:
            count = tl.load(sst + S_CCOUNT * S + s)
            region = cand + tl.load(stab + G_COFF * S + s)
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
            update_candidates(
                ttab,
                T,
                ws,
                tl.load(stab + G_TENSOR * S + s),
                tl.load(stab + G_START * S + s),
                region,
                0,
                count,
                thr,
                eps,
                decay,
                PDT,
                MDT,
                DECAY,
                IDXB,
                TILE,
            )
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
