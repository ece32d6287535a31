"""The exact fallback: the k-th largest composite key of a segment read from its data.

Runs for the segments the window select marked ``MODE_EXACT`` (no previous threshold, the
threshold moved out of the window, or a boundary bin over the candidate capacity, which takes
heavy ties) and exits at once for the others, so the launch costs nothing when it is not
needed. One program per segment radix-selects over the 63-bit composite key with 8-bit
digits from the top, re-reading the keys at each level, and stops as soon as the rank left
equals its bucket's population: the key digits for distinct values, the index digits only
under ties. This is slow on a long segment (one program reads it several times) and is
meant to be rare.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    G_K,
    G_LEN,
    G_START,
    G_TENSOR,
    MODE_EXACT,
    S_MODE,
    S_THR,
    key_digit_histogram,
    radix_digit,
    skip_step,
)


@triton.jit
def exact_select_kernel(
    ttab,
    T,
    ws,
    sst,
    S,
    stab,
    found_inf_ptr,
    grad_scale_ptr,
    hash_counter,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    KEY_MODE: tl.constexpr,
    HAS_INF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    USE_HCOUNTER: tl.constexpr,
    HUGE: tl.constexpr,
    IDXB: tl.constexpr,
    CHUNK: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_INF):
        return
    s = tl.program_id(0)
    if tl.load(sst + S_MODE * S + s) != MODE_EXACT:
        return
    t = tl.load(stab + G_TENSOR * S + s)
    start = tl.load(stab + G_START * S + s)
    n = tl.load(stab + G_LEN * S + s)
    r = tl.load(stab + G_K * S + s)
    prefix = tl.zeros([], tl.int64)
    shift = tl.zeros([], tl.int64) + 56
    done = tl.zeros([], tl.int32)
    while done == 0:
        acc = tl.zeros([256], tl.int64)  # a digit may hold all of a segment's 2**32 entries
        for j in range(0, n, CHUNK):
            acc += key_digit_histogram(
                ttab,
                T,
                t,
                ws,
                start + j,
                j,
                n - j,
                prefix,
                shift,
                grad_scale_ptr,
                hash_counter,
                PDT,
                MDT,
                KEY_MODE,
                HAS_SCALE,
                USE_HCOUNTER,
                HUGE,
                IDXB,
                CHUNK,
            )
        r, prefix, found, thr = radix_digit(acc, r, prefix, shift)
        done = found.to(tl.int32)
        tl.store(sst + S_THR * S + s, thr, mask=found)
        shift = tl.where(found, shift, shift - 8)
