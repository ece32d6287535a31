"""Pass 1 of the exact top-k path and the window select that follows it.

Pass 1 (``moments_window_kernel``) updates m and v of every entry (reads g, m, v; writes m,
v: 20 B/param in fp32) and histograms the window digit of each entry's key
(``_common.window_digit``): with float keys, 2**FRAC bins per binade over a window of
(NB - 3) / 2**FRAC binades centred on the segment's previous threshold, plus a zero bin and a
clamp bin on each side. Programs are persistent: each walks a contiguous run of chunks and
keeps its histogram in registers until the segment changes, so a segment costs one flush per
program rather than one per chunk. The count of exact zeros of each chunk is stored too.

``window_select_kernel`` (one program per segment) finds the bin holding the k-th largest
key and decides how pass 2 selects (``MODE_*`` in ``_common``): the bin is taken whole,
resolved among its compacted candidates, completed by the first zeros in index order (the
chunk zero counts become exclusive prefix sums here), or left to the exact fallback when the
bin is a clamp bin (the threshold moved out of the window, or there is no previous one) or
holds more entries than the segment's candidate capacity (for a shard, more on one rank than
that rank's capacity). Counts are int64: a segment holds up to 2**32 entries, and one bin
may hold all of them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    C_LEN,
    C_SEG,
    C_START,
    C_TENSOR,
    G_CAP,
    G_CFIRST,
    G_K,
    G_NCHUNKS,
    MODE_DIGIT,
    MODE_EXACT,
    MODE_WINDOW,
    MODE_ZERO,
    S_CCOUNT,
    S_DONE,
    S_DSEL,
    S_MODE,
    S_PREFIX,
    S_R,
    abs_key,
    chunk_range,
    flush_histogram,
    hash_key_of,
    pick_bin,
    skip_step,
    step_moments,
    tensor_pointers,
    window_base,
    window_digit,
)


@triton.jit
def _moments_window_body(
    ttab,
    T,
    t,
    ws,
    g_ptr,
    m_ptr,
    v_ptr,
    start,
    n,
    base,
    grad_scale_ptr,
    beta1,
    omb1,
    beta2,
    omb2,
    hash_counter,
    MDT: tl.constexpr,
    KEY_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    USE_HCOUNTER: tl.constexpr,
    HUGE: tl.constexpr,
    FRAC: tl.constexpr,
    NB_LOG2: tl.constexpr,
    CHUNK: tl.constexpr,
):
    lane = tl.arange(0, CHUNK)
    offs = start + lane
    mask = lane < n
    g, m, v = step_moments(
        g_ptr, m_ptr, v_ptr, offs, mask, grad_scale_ptr, beta1, omb1, beta2, omb2, HAS_SCALE, MDT
    )
    if KEY_MODE == 0:
        key = abs_key(m)
    elif KEY_MODE == 1:
        key = abs_key(g)
    else:
        key = hash_key_of(ttab, T, t, ws, offs, hash_counter, USE_HCOUNTER, HUGE)
    digit = window_digit(key, base, KEY_MODE != 2, FRAC, NB_LOG2)
    return tl.histogram(digit, 1 << NB_LOG2, mask=mask)


@triton.jit
def moments_window_kernel(
    ttab,
    T,
    ctab,
    C,
    per_program,
    ws,
    sst,
    S,
    hist,
    zcount,
    found_inf_ptr,
    grad_scale_ptr,
    beta1,
    omb1,
    beta2,
    omb2,
    hash_counter,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    KEY_MODE: tl.constexpr,
    HAS_INF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    USE_HCOUNTER: tl.constexpr,
    HUGE: tl.constexpr,
    ALIGNED: tl.constexpr,
    FRAC: tl.constexpr,
    NB_LOG2: tl.constexpr,
    CHUNK: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_INF):
        return
    NB: tl.constexpr = 1 << NB_LOG2
    bins = tl.arange(0, NB)
    c0, c1 = chunk_range(per_program, C)
    acc = tl.zeros([NB], tl.int64)  # one program may walk a whole segment of up to 2**32 entries
    cur = tl.zeros([], tl.int64) - 1
    for c in range(c0, c1):
        seg = tl.load(ctab + C_SEG * C + c)
        changed = seg != cur
        flush_histogram(hist, cur, acc, changed, NB)
        acc = tl.where(changed, 0, acc)
        cur = seg
        t = tl.load(ctab + C_TENSOR * C + c)
        start = tl.load(ctab + C_START * C + c)
        n = tl.load(ctab + C_LEN * C + c)
        base = window_base(sst, S, seg, NB_LOG2).to(tl.int32)
        _, g_ptr, m_ptr, v_ptr = tensor_pointers(ttab, T, t, PDT, MDT, ALIGNED)
        if ALIGNED:
            start = tl.multiple_of(start, 16)
        if ALIGNED and n == CHUNK:
            h = _moments_window_body(
                ttab,
                T,
                t,
                ws,
                g_ptr,
                m_ptr,
                v_ptr,
                start,
                CHUNK,
                base,
                grad_scale_ptr,
                beta1,
                omb1,
                beta2,
                omb2,
                hash_counter,
                MDT,
                KEY_MODE,
                HAS_SCALE,
                USE_HCOUNTER,
                HUGE,
                FRAC,
                NB_LOG2,
                CHUNK,
            )
        else:
            h = _moments_window_body(
                ttab,
                T,
                t,
                ws,
                g_ptr,
                m_ptr,
                v_ptr,
                start,
                n,
                base,
                grad_scale_ptr,
                beta1,
                omb1,
                beta2,
                omb2,
                hash_counter,
                MDT,
                KEY_MODE,
                HAS_SCALE,
                USE_HCOUNTER,
                HUGE,
                FRAC,
                NB_LOG2,
                CHUNK,
            )
        acc += h
        if KEY_MODE != 2:
            tl.store(zcount + c, tl.sum(tl.where(bins == 0, h, 0), axis=0).to(tl.int64))
    flush_histogram(hist, cur, acc, cur >= 0, NB)


@triton.jit
def window_select_kernel(
    hist,
    hist_max,
    sst,
    S,
    stab,
    zcount,
    ztotal,
    rank,
    world,
    found_inf_ptr,
    HAS_INF: tl.constexpr,
    FLOAT_KEY: tl.constexpr,
    FRAC: tl.constexpr,
    NB_LOG2: tl.constexpr,
    IDXB: tl.constexpr,
    TOP_SHIFT: tl.constexpr,
    SCAN: tl.constexpr,
    SHARDED: tl.constexpr,
):
    """One program per segment: the boundary bin, the mode, and the histogram row reset.

    ``hist`` holds the counts over every rank; for sharded segments ``hist_max`` holds the
    largest count of each bin on any one rank. Each rank compacts its own entries of the
    boundary bin into its candidate region, so that largest count, not the sum, is what the
    per-rank capacity must hold.

    For the level-by-level selects of sharded segments it also sets the digits the window
    bin fixes (``S_PREFIX``, above ``TOP_SHIFT + 8``) and, in ``MODE_ZERO``, this rank's count
    of zeros in its row of ``ztotal`` [world, S] (the other rows zeroed, all-reduced by the
    launcher)."""
    if skip_step(found_inf_ptr, HAS_INF):
        return
    s = tl.program_id(0)
    NB: tl.constexpr = 1 << NB_LOG2
    bins = tl.arange(0, NB)
    row = hist + s * NB + bins
    h = tl.load(row)
    if SHARDED:
        h_rank = tl.load(hist_max + s * NB + bins)
    else:
        h_rank = h
    tl.store(row, tl.zeros([NB], tl.int64))
    k = tl.load(stab + G_K * S + s)
    b, r, h_b = pick_bin(h, bins, k)
    whole = r == h_b
    if FLOAT_KEY:
        zero = b == 0
        miss = (b == 1) | (b == NB - 1)
    else:
        zero = b < 0
        miss = b < 0
    over = tl.sum(tl.where(bins == b, h_rank, 0), axis=0) > tl.load(stab + G_CAP * S + s)
    mode = tl.where(
        whole, MODE_DIGIT, tl.where(zero, MODE_ZERO, tl.where(miss | over, MODE_EXACT, MODE_WINDOW))
    )
    dsel = tl.where(whole, b - 1, b).to(tl.int64)
    tl.store(sst + S_MODE * S + s, mode.to(tl.int64))
    tl.store(sst + S_DSEL * S + s, dsel)
    tl.store(sst + S_R * S + s, tl.where(mode == MODE_EXACT, k, r))  # the fallback ranks from the top
    tl.store(sst + S_CCOUNT * S + s, tl.zeros([], tl.int64))
    tl.store(sst + S_DONE * S + s, tl.zeros([], tl.int64))
    if FLOAT_KEY:
        fine = window_base(sst, S, s, NB_LOG2) + dsel
        fixed = fine << (23 - FRAC + IDXB)
    else:
        fixed = dsel << (32 - NB_LOG2 + IDXB)
    tl.store(sst + S_PREFIX * S + s, tl.where(mode == MODE_WINDOW, fixed >> (TOP_SHIFT + 8), 0))
    for other in range(0, world):
        tl.store(ztotal + other * S + s, tl.zeros([], tl.int64))
    if mode == MODE_ZERO:
        # the zeros before each chunk of the segment, so pass 2 ranks its zeros by index
        first = tl.load(stab + G_CFIRST * S + s)
        count = tl.load(stab + G_NCHUNKS * S + s)
        lane = tl.arange(0, SCAN)
        carry = tl.zeros([], tl.int64)
        for j in range(0, count, SCAN):
            cmask = j + lane < count
            z = tl.load(zcount + first + j + lane, mask=cmask, other=0)
            tl.store(zcount + first + j + lane, carry + tl.cumsum(z, axis=0) - z, mask=cmask)
            carry += tl.sum(z, axis=0)
        tl.store(ztotal + rank * S + s, carry)
