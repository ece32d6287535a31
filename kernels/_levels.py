"""Level-by-level selects spread over many programs: sharded segments and long segments.

Used instead of the one-program-per-segment fallback and resolve when a call holds a segment
of at least ``KernelConfig.spread_min`` entries (on one device, where one program reading a
long segment leaves the rest of the GPU idle) and for every sharded segment (FSDP2, where the
decisions must be taken over all ranks). Each level is a launch of many programs that add
into a ``[segments, 256]`` histogram with atomics, then :func:`level_select_kernel`, one
program per segment over its 256 bins. For shards the launcher all-reduces the histogram on
the stream between the two, so every rank takes the same decision, and the composite keys use
global indices (the chunk table's segment offset is minus the shard's offset), so "the k
largest composite keys over all ranks" is the single-process selection. The number of
launches is fixed (8 levels for the fallback, up to 7 for the candidates: no host
synchronisation), and a level with nothing to do exits at once. Three kernels read data:

* ``data_level_kernel``: the segments the window select left to the fallback
  (``MODE_EXACT``) re-read their keys, 8 bits of the composite per level from the top,
  persistent programs over the chunk table;
* ``cand_level_kernel``: the segments resolved in the window (``MODE_WINDOW``) histogram their
  compacted candidates, from the highest digit the window bin leaves open, persistent programs
  over the candidate blocks (``Plan.btab``);
* ``cand_update_kernel``: once the threshold is known, the same programs update the selected
  candidates (``_resolve.resolve_kernel`` then only moves the window).

``level_select_kernel`` picks the digit of the r-th largest in a segment's row, resets the
row, and stores the threshold once the rank left is the population of its bucket (or the last
digit is reached).
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
    G_START,
    G_TENSOR,
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
    update_candidates,
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
def _block(btab, B, b, sst, S, stab):
    """Candidate block ``b``: its segment, its candidates' region and its first candidate, and
    the segment's candidate count."""
    seg = tl.load(btab + b)
    off = tl.load(btab + B + b)
    return seg, tl.load(stab + G_COFF * S + seg), off, tl.load(sst + S_CCOUNT * S + seg)


@triton.jit
def cand_level_kernel(
    sst,
    S,
    stab,
    btab,
    B,
    per_program,
    cand,
    hist,
    found_inf_ptr,
    shift,
    HAS_INF: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One candidate level, persistent programs over the candidate blocks."""
    if skip_step(found_inf_ptr, HAS_INF):
        return
    b0, b1 = chunk_range(per_program, B)
    acc = tl.zeros([256], tl.int64)
    cur = tl.zeros([], tl.int64) - 1
    for b in range(b0, b1):
        seg, coff, off, count = _block(btab, B, b, sst, S, stab)
        changed = seg != cur
        flush_histogram(hist, cur, acc, changed, 256)
        acc = tl.where(changed, 0, acc)
        cur = seg
        open_ = (tl.load(sst + S_MODE * S + seg) == MODE_WINDOW) & (tl.load(sst + S_DONE * S + seg) == 0)
        if open_ & (off < count):
            acc += candidate_histogram(
                cand + coff + off,
                tl.minimum(count - off, BLOCK),
                tl.load(sst + S_PREFIX * S + seg),
                shift,
                TILE,
            ).to(tl.int64)
    flush_histogram(hist, cur, acc, cur >= 0, 256)


@triton.jit
def cand_update_kernel(
    ttab,
    T,
    ws,
    sst,
    S,
    stab,
    btab,
    B,
    per_program,
    cand,
    found_inf_ptr,
    eps,
    decay,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    HAS_INF: tl.constexpr,
    DECAY: tl.constexpr,
    IDXB: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The candidates at or above their segment's threshold take the step (all of them decay
    when every entry decays), persistent programs over the candidate blocks."""
    if skip_step(found_inf_ptr, HAS_INF):
        return
    b0, b1 = chunk_range(per_program, B)
    for b in range(b0, b1):
        seg, coff, off, count = _block(btab, B, b, sst, S, stab)
        if (tl.load(sst + S_MODE * S + seg) == MODE_WINDOW) & (off < count):
            update_candidates(
                ttab,
                T,
                ws,
                tl.load(stab + G_TENSOR * S + seg),
                tl.load(stab + G_START * S + seg),
                cand + coff,
                off,
                tl.minimum(count, off + BLOCK),
                tl.load(sst + S_THR * S + seg),
                eps,
                decay,
                PDT,
                MDT,
                DECAY,
                IDXB,
                TILE,
            )


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
