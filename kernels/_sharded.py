"""Level-by-level selects for sharded segments (FSDP2): exact over the whole tensor.

A rank holds a contiguous range of each sharded tensor's global flat indices, and the
composite keys use global indices (the chunk table's segment offset is minus the shard's
offset), so "the k largest composite keys over all ranks" is the single-process selection.
Between two launches the launcher all-reduces a ``[segments, 256]`` histogram on the stream,
so every rank takes the same decision; the number of launches and collectives is fixed
(8 levels for the fallback, 7 for the candidates), and a level with nothing to do exits at
once. Two sources of keys:

* ``data_level_kernel``: the segments the window select left to the fallback
  (``MODE_EXACT``) re-read their keys, 8 bits of the composite per level from the top;
* ``cand_level_kernel``: the segments resolved in the window (``MODE_WINDOW``) histogram their
  compacted candidates, from the highest digit the window bin leaves open.

``level_select_kernel`` (one program per segment) picks the digit of the r-th largest in
the all-reduced row, resets the row, and stores the threshold once the rank left is the
population of its bucket (or the last digit is reached).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    C_LEN,
    C_SEG,
    C_SEGOFF,
    C_START,
    C_TENSOR,
    G_COFF,
    MODE_EXACT,
    MODE_WINDOW,
    S_CCOUNT,
    S_DONE,
    S_MODE,
    S_PREFIX,
    S_R,
    S_THR,
    candidate_histogram,
    chunk_range,
    flush_histogram,
    key_digit_histogram,
    radix_digit,
    skip_step,
)


@triton.jit
def data_level_kernel(
    ttab,
    T,
    ctab,
    C,
    per_program,
    ws,
    sst,
    S,
    hist,
    found_inf_ptr,
    grad_scale_ptr,
    hash_counter,
    shift,
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
    """One fallback level over the data, persistent programs over the chunks."""
    if skip_step(found_inf_ptr, HAS_INF):
        return
    c0, c1 = chunk_range(per_program, C)
    acc = tl.zeros([256], tl.int64)  # one program may walk a whole segment of up to 2**32 entries
    cur = tl.zeros([], tl.int64) - 1
    for c in range(c0, c1):
        seg = tl.load(ctab + C_SEG * C + c)
        changed = seg != cur
        flush_histogram(hist, cur, acc, changed, 256)
        acc = tl.where(changed, 0, acc)
        cur = seg
        wanted = (tl.load(sst + S_MODE * S + seg) == MODE_EXACT) & (tl.load(sst + S_DONE * S + seg) == 0)
        if wanted:
            start = tl.load(ctab + C_START * C + c)
            acc += key_digit_histogram(
                ttab,
                T,
                tl.load(ctab + C_TENSOR * C + c),
                ws,
                start,
                start - tl.load(ctab + C_SEGOFF * C + c),
                tl.load(ctab + C_LEN * C + c),
                tl.load(sst + S_PREFIX * S + seg),
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
    flush_histogram(hist, cur, acc, cur >= 0, 256)


@triton.jit
def cand_level_kernel(
    sst,
    S,
    stab,
    cand,
    hist,
    found_inf_ptr,
    shift,
    HAS_INF: tl.constexpr,
    TILE: tl.constexpr,
):
    """One candidate level: one program per segment over its compacted candidates."""
    if skip_step(found_inf_ptr, HAS_INF):
        return
    s = tl.program_id(0)
    if (tl.load(sst + S_MODE * S + s) != MODE_WINDOW) | (tl.load(sst + S_DONE * S + s) != 0):
        return
    acc = candidate_histogram(
        cand + tl.load(stab + G_COFF * S + s),
        tl.load(sst + S_CCOUNT * S + s),
        tl.load(sst + S_PREFIX * S + s),
        shift,
        TILE,
    )
    tl.store(hist + s * 256 + tl.arange(0, 256), acc.to(tl.int64))


@triton.jit
def level_select_kernel(hist, sst, S, found_inf_ptr, shift, MODE: tl.constexpr, HAS_INF: tl.constexpr):
    """One program per segment of mode ``MODE`` still open: the digit at ``shift``."""
    if skip_step(found_inf_ptr, HAS_INF):
        return
    s = tl.program_id(0)
    row = hist + s * 256 + tl.arange(0, 256)
    h = tl.load(row)
    tl.store(row, tl.zeros([256], tl.int64))
    if (tl.load(sst + S_MODE * S + s) == MODE) & (tl.load(sst + S_DONE * S + s) == 0):
        r, prefix, found, thr = radix_digit(
            h, tl.load(sst + S_R * S + s), tl.load(sst + S_PREFIX * S + s), shift
        )
        tl.store(sst + S_R * S + s, r)
        tl.store(sst + S_PREFIX * S + s, prefix)
        if found:
            tl.store(sst + S_DONE * S + s, tl.zeros([], tl.int64) + 1)
            tl.store(sst + S_THR * S + s, thr)
