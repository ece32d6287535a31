"""Exact per-segment k-th largest composite key by radix (histogram) refinement.

Levels split the 63-bit composite key ``(key << IDXB) | (IDXMASK - i)`` into digits from the
top. Level 1's histogram is built by the moments pass and ``select_kernel`` (one program per
segment) picks the digit holding the k-th largest entry. Level 2 re-reads the key (|m| or
|g|: 4 B/param in fp32) and, for the entries in the boundary bucket, histograms the next
digit *and* appends their composite keys to the segment's region of a candidate buffer
(``PHASE == 1``). The remaining levels read only those candidates (``cand_refine_kernel``: a
few percent of the entries, 8 B each), so the data is read twice in all (moments pass, level
2) plus the apply pass. A segment whose boundary bucket overflows its candidate capacity
(e.g. most |m| exactly 0) falls back to re-reading the data at every level (``PHASE == 2``);
with compaction off every level reads the data (``PHASE == 0``).

A segment is done as soon as the remaining rank equals its bucket's population (for fp32 keys
without exact ties: after the key digits); later levels skip it without reading anything.
Digits below the key are the index: they only run for segments whose k-th value is tied, and
then over the chunks whose index range can still hold the boundary.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    C_LEN, C_SEG, C_SEGOFF, C_START, C_TENSOR, G_CAP, G_COFF, K_SEG, K_START, ROW_G, ROW_HKEY,
    ROW_M, S_CCOUNT, S_DONE, S_PREFIX, S_R, S_THR, WS_T,
    abs_key, hash_u, load_grad, skip_step, stream_key,
)


@triton.jit
def load_key(
    ttab, T, t, ws, offs, mask, grad_scale_ptr, hash_counter,
    PDT: tl.constexpr, KEY_MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
    USE_HCOUNTER: tl.constexpr, HUGE: tl.constexpr, ALIGNED: tl.constexpr,
):
    """The selection key (uint32) of entries ``offs`` of tensor ``t``; same bits as pass 1."""
    if KEY_MODE == 0:
        m_ptr = tl.load(ttab + ROW_M * T + t).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            m_ptr = tl.multiple_of(m_ptr, 16)
        key = abs_key(tl.load(m_ptr + offs, mask=mask, other=0.0))
    elif KEY_MODE == 1:
        g_ptr = tl.load(ttab + ROW_G * T + t).to(tl.pointer_type(PDT))
        if ALIGNED:
            g_ptr = tl.multiple_of(g_ptr, 16)
        key = abs_key(load_grad(g_ptr, offs, mask, grad_scale_ptr, HAS_SCALE))
    else:
        if USE_HCOUNTER:
            counter = (tl.zeros([], tl.int64) + hash_counter)
        else:
            counter = tl.load(ws + WS_T * T + t).to(tl.int64)
        skey = stream_key(tl.load(ttab + ROW_HKEY * T + t), counter)
        key = hash_u(offs, skey, HUGE)
    return key


@triton.jit
def composite(key, local_idx, IDXB: tl.constexpr):
    return (key.to(tl.int64) << IDXB) | (((1 << IDXB) - 1) - local_idx)


@triton.jit
def _refine_body(
    ttab, T, t, ws, hist, sst, S, stab, cand, seg, prefix, start, lstart, n, grad_scale_ptr, hash_counter,
    PDT: tl.constexpr, KEY_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, USE_HCOUNTER: tl.constexpr,
    HUGE: tl.constexpr, ALIGNED: tl.constexpr, PHASE: tl.constexpr, IDXB: tl.constexpr,
    SHIFT: tl.constexpr, BITS: tl.constexpr, CHUNK: tl.constexpr,
):
    lane = tl.arange(0, CHUNK)
    offs = start + lane
    mask = lane < n
    key = load_key(ttab, T, t, ws, offs, mask, grad_scale_ptr, hash_counter,
                   PDT, KEY_MODE, HAS_SCALE, USE_HCOUNTER, HUGE, ALIGNED)
    comp = composite(key, lstart + lane, IDXB)
    match = mask & ((comp >> (SHIFT + BITS)) == prefix)
    digit = ((comp >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)
    h = tl.histogram(digit, 1 << BITS, mask=match)
    bins = tl.arange(0, 1 << BITS)
    tl.atomic_add(hist + seg * (1 << BITS) + bins, h, mask=h > 0, sem="relaxed")
    if PHASE == 1:
        hits = match.to(tl.int32)
        cnt = tl.sum(hits, axis=0)
        if cnt > 0:
            base = tl.atomic_add(sst + S_CCOUNT * S + seg, cnt.to(tl.int64), sem="relaxed")
            pos = base + (tl.cumsum(hits, axis=0) - 1).to(tl.int64)
            cap = tl.load(stab + G_CAP * S + seg)
            tl.store(cand + tl.load(stab + G_COFF * S + seg) + pos, comp, mask=match & (pos < cap))


@triton.jit
def refine_kernel(
    ttab, T, ctab, C, ws, hist, sst, S, stab, cand, found_inf_ptr, grad_scale_ptr, hash_counter,
    PDT: tl.constexpr, KEY_MODE: tl.constexpr, HAS_INF: tl.constexpr, HAS_SCALE: tl.constexpr,
    USE_HCOUNTER: tl.constexpr, HUGE: tl.constexpr, ALIGNED: tl.constexpr, PHASE: tl.constexpr,
    IDXB: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr, CHUNK: tl.constexpr,
):
    """One level over the data (one program per chunk). PHASE 0: plain; 1: also compact the
    matching entries into the candidate buffer; 2: only segments whose candidates overflowed."""
    if skip_step(found_inf_ptr, HAS_INF):
        return
    c = tl.program_id(0)
    seg = tl.load(ctab + C_SEG * C + c)
    if tl.load(sst + S_DONE * S + seg) != 0:
        return
    if PHASE == 2:
        if tl.load(sst + S_CCOUNT * S + seg) <= tl.load(stab + G_CAP * S + seg):
            return
    prefix = tl.load(sst + S_PREFIX * S + seg)
    start = tl.load(ctab + C_START * C + c)
    n = tl.load(ctab + C_LEN * C + c)
    lstart = start - tl.load(ctab + C_SEGOFF * C + c)
    HI: tl.constexpr = SHIFT + BITS
    if HI <= IDXB:
        # every key bit is fixed: the prefix bounds the index of the remaining candidates
        low_min = (prefix << HI) & ((1 << IDXB) - 1)
        idx_hi = ((1 << IDXB) - 1) - low_min
        idx_lo = idx_hi - ((1 << HI) - 1)
        if (lstart + n <= idx_lo) | (lstart > idx_hi):
            return
    t = tl.load(ctab + C_TENSOR * C + c)
    if ALIGNED:  # see dense_step_kernel: 128-bit accesses on full chunks
        start = tl.multiple_of(start, 16)
        if n == CHUNK:
            _refine_body(ttab, T, t, ws, hist, sst, S, stab, cand, seg, prefix, start, lstart, CHUNK,
                         grad_scale_ptr, hash_counter, PDT, KEY_MODE, HAS_SCALE, USE_HCOUNTER, HUGE,
                         ALIGNED, PHASE, IDXB, SHIFT, BITS, CHUNK)
            return
    _refine_body(ttab, T, t, ws, hist, sst, S, stab, cand, seg, prefix, start, lstart, n,
                 grad_scale_ptr, hash_counter, PDT, KEY_MODE, HAS_SCALE, USE_HCOUNTER, HUGE,
                 ALIGNED, PHASE, IDXB, SHIFT, BITS, CHUNK)


@triton.jit
def cand_refine_kernel(
    ktab, K, hist, sst, S, stab, cand, found_inf_ptr,
    HAS_INF: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr, CHUNK: tl.constexpr,
):
    """One level over the compacted candidates (one program per candidate chunk)."""
    if skip_step(found_inf_ptr, HAS_INF):
        return
    c = tl.program_id(0)
    seg = tl.load(ktab + K_SEG * K + c)
    if tl.load(sst + S_DONE * S + seg) != 0:
        return
    count = tl.load(sst + S_CCOUNT * S + seg)
    if count > tl.load(stab + G_CAP * S + seg):
        return  # overflowed: refine_kernel(PHASE=2) reads the data instead
    start = tl.load(ktab + K_START * K + c)
    if start >= count:
        return
    prefix = tl.load(sst + S_PREFIX * S + seg)
    i = start + tl.arange(0, CHUNK)
    mask = i < count
    comp = tl.load(cand + tl.load(stab + G_COFF * S + seg) + i, mask=mask, other=0)
    HI: tl.constexpr = SHIFT + BITS
    match = mask & ((comp >> HI) == prefix)
    digit = ((comp >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)
    h = tl.histogram(digit, 1 << BITS, mask=match)
    bins = tl.arange(0, 1 << BITS)
    tl.atomic_add(hist + seg * (1 << BITS) + bins, h, mask=h > 0, sem="relaxed")


@triton.jit
def select_kernel(
    hist, sst, S, stab, found_inf_ptr,
    HAS_INF: tl.constexpr, FIRST: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
):
    """One program per segment: find the digit of the k-th largest; reset the histogram row."""
    if skip_step(found_inf_ptr, HAS_INF):
        return
    s = tl.program_id(0)
    if tl.load(sst + S_DONE * S + s) != 0:
        return
    bins = tl.arange(0, 1 << BITS)
    row = hist + s * (1 << BITS) + bins
    h = tl.load(row).to(tl.int64)
    tl.store(row, tl.zeros([1 << BITS], tl.int32))
    if FIRST:
        r = tl.load(stab + s)
        prefix = tl.zeros([], tl.int64)
    else:
        r = tl.load(sst + S_R * S + s)
        prefix = tl.load(sst + S_PREFIX * S + s)
    total = tl.sum(h, axis=0)
    gt = total - tl.cumsum(h, axis=0)  # entries in higher digits
    ge = gt + h
    b = tl.max(tl.where(ge >= r, bins, -1), axis=0)
    gt_b = tl.sum(tl.where(bins == b, gt, 0), axis=0)
    h_b = tl.sum(tl.where(bins == b, h, 0), axis=0)
    r = r - gt_b
    prefix = (prefix << BITS) | b.to(tl.int64)
    tl.store(sst + S_R * S + s, r)
    tl.store(sst + S_PREFIX * S + s, prefix)
    fin = r == h_b
    if SHIFT == 0:
        fin = r == r  # the last digit always ends the search (composite keys are distinct)
    if fin:
        tl.store(sst + S_DONE * S + s, 1)
        tl.store(sst + S_THR * S + s, prefix << SHIFT)
