"""Pass 2 of the exact top-k path: the masked Adam update and the candidate compaction.

Persistent programs walk contiguous runs of chunks. Each re-reads the key (|m| for the
momentum filter, |g| for the gradient filter, the hash for exact RandomBCD) and selects by its
segment's mode (``_common.MODE_*``): window digit above the boundary bin, plus the first zeros
by index in ``MODE_ZERO``; composite key at or above the fallback's threshold in
``MODE_EXACT``. In ``MODE_WINDOW`` the entries of the boundary bin are appended to the
segment's candidate region (one atomic per chunk) and left for ``_resolve``.

A chunk is laid out as rows of ``SEC`` entries, one 32-byte sector of p (8 fp32 or 16 bf16):
v, p (and m when it is not the key) are read and p written for whole sectors that hold a
selected entry, so the accesses stay 128-bit wide; the unselected entries of such a sector are
written back unchanged. Sectors without a selected entry are not touched.
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
    G_CAP,
    G_COFF,
    MODE_EXACT,
    MODE_WINDOW,
    MODE_ZERO,
    S_CCOUNT,
    S_DSEL,
    S_MODE,
    S_R,
    S_THR,
    S_ZBASE,
    WS_BC2_SQRT,
    WS_STEP_SIZE,
    abs_key,
    adam_update,
    as_param,
    chunk_range,
    composite,
    load_key,
    skip_step,
    tensor_pointers,
    window_base,
    window_digit,
)


@triton.jit
def _prefix_sum_2d(x):
    """Inclusive prefix sum of an int32 [R, SEC] tensor in row-major (index) order."""
    rows = tl.sum(x, axis=1)
    return tl.cumsum(x, axis=1) + (tl.cumsum(rows, axis=0) - rows)[:, None]


@triton.jit
def _apply_body(
    ttab,
    T,
    t,
    ws,
    sst,
    S,
    stab,
    cand,
    zcount,
    c,
    seg,
    p_ptr,
    m_ptr,
    v_ptr,
    start,
    lstart,
    n,
    grad_scale_ptr,
    eps,
    decay,
    hash_counter,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    KEY_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DECAY: tl.constexpr,
    USE_HCOUNTER: tl.constexpr,
    HUGE: tl.constexpr,
    ALIGNED: tl.constexpr,
    IDXB: tl.constexpr,
    FRAC: tl.constexpr,
    NB_LOG2: tl.constexpr,
    SEC: tl.constexpr,
    CHUNK: tl.constexpr,
    FULL: tl.constexpr,
):
    R: tl.constexpr = CHUNK // SEC
    cols = tl.arange(0, SEC)[None, :]
    lane = tl.arange(0, R)[:, None] * SEC + cols
    offs = start + lane
    if FULL:  # a constant mask keeps the accesses vectorised
        mask = tl.full([R, SEC], 1, tl.int1)
    else:
        mask = lane < n
    mode = tl.load(sst + S_MODE * S + seg)
    base = window_base(sst, S, seg, NB_LOG2).to(tl.int32)
    if KEY_MODE == 0:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        key = abs_key(m)
    else:
        key = load_key(
            ttab,
            T,
            t,
            ws,
            offs,
            mask,
            grad_scale_ptr,
            hash_counter,
            PDT,
            MDT,
            KEY_MODE,
            HAS_SCALE,
            USE_HCOUNTER,
            HUGE,
            ALIGNED,
        )
    digit = window_digit(key, base, KEY_MODE != 2, FRAC, NB_LOG2)
    dsel = tl.load(sst + S_DSEL * S + seg)
    # composite >= thr without 64-bit vectors (registers): a larger key, or the threshold's key
    # at an index up to the threshold's
    thr = tl.load(sst + S_THR * S + seg)
    thr_key = (thr >> IDXB).to(tl.uint32)
    last = ((1 << IDXB) - 1) - (thr & ((1 << IDXB) - 1)) - lstart  # last lane taken among ties
    last = tl.minimum(tl.maximum(last, -1), CHUNK).to(tl.int32)
    at_or_above = (key > thr_key) | ((key == thr_key) & (lane <= last))
    sel = tl.where(mode == MODE_EXACT, at_or_above, digit > dsel)
    if KEY_MODE != 2:
        if mode == MODE_ZERO:
            zero = mask & (key == 0)
            before = tl.load(zcount + c) + tl.load(sst + S_ZBASE * S + seg)  # earlier chunks and ranks
            rank = before + _prefix_sum_2d(zero.to(tl.int32))
            sel = sel | (zero & (rank <= tl.load(sst + S_R * S + seg)))
    sel = sel & mask
    is_cand = mask & (digit == dsel) & (mode == MODE_WINDOW)
    if mode == MODE_WINDOW:
        hits = is_cand.to(tl.int32)
        cnt = tl.sum(tl.sum(hits, axis=1), axis=0)
        if cnt > 0:
            at = tl.atomic_add(sst + S_CCOUNT * S + seg, cnt.to(tl.int64), sem="relaxed")
            pos = at + (_prefix_sum_2d(hits) - 1).to(tl.int64)
            room = pos < tl.load(stab + G_CAP * S + seg)
            comp = composite(key, lstart + lane, IDXB)
            tl.store(cand + tl.load(stab + G_COFF * S + seg) + pos, comp, mask=is_cand & room)

    sector = (tl.max(sel.to(tl.int32), axis=1) > 0)[:, None] & (cols < SEC)
    if KEY_MODE != 0:
        m = tl.load(m_ptr + offs, mask=sector & mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=sector & mask, other=0.0).to(tl.float32)
    if DECAY == 2:  # every entry decays, but the candidates only once they are resolved
        pmask = mask
    else:
        pmask = sector & mask
    p = tl.load(p_ptr + offs, mask=pmask, other=0.0).to(tl.float32)
    step_size = tl.load(ws + WS_STEP_SIZE * T + t)
    bc2_sqrt = tl.load(ws + WS_BC2_SQRT * T + t)
    new = adam_update(p, m, v, step_size, bc2_sqrt, eps, decay, sel, DECAY)
    if DECAY == 2:
        new = tl.where(is_cand, p, new)
    tl.store(p_ptr + offs, as_param(new, PDT), mask=pmask)


@triton.jit
def apply_compact_kernel(
    ttab,
    T,
    ctab,
    C,
    per_program,
    ws,
    sst,
    S,
    stab,
    cand,
    zcount,
    found_inf_ptr,
    grad_scale_ptr,
    eps,
    decay,
    hash_counter,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    KEY_MODE: tl.constexpr,
    HAS_INF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DECAY: tl.constexpr,
    USE_HCOUNTER: tl.constexpr,
    HUGE: tl.constexpr,
    ALIGNED: tl.constexpr,
    IDXB: tl.constexpr,
    FRAC: tl.constexpr,
    NB_LOG2: tl.constexpr,
    SEC: tl.constexpr,
    CHUNK: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_INF):
        return
    c0, c1 = chunk_range(per_program, C)
    for c in range(c0, c1):
        t = tl.load(ctab + C_TENSOR * C + c)
        start = tl.load(ctab + C_START * C + c)
        n = tl.load(ctab + C_LEN * C + c)
        seg = tl.load(ctab + C_SEG * C + c)
        lstart = start - tl.load(ctab + C_SEGOFF * C + c)
        p_ptr, _, m_ptr, v_ptr = tensor_pointers(ttab, T, t, PDT, MDT, ALIGNED)
        if ALIGNED:
            start = tl.multiple_of(start, 16)
        if ALIGNED and n == CHUNK:
            _apply_body(
                ttab,
                T,
                t,
                ws,
                sst,
                S,
                stab,
                cand,
                zcount,
                c,
                seg,
                p_ptr,
                m_ptr,
                v_ptr,
                start,
                lstart,
                CHUNK,
                grad_scale_ptr,
                eps,
                decay,
                hash_counter,
                PDT,
                MDT,
                KEY_MODE,
                HAS_SCALE,
                DECAY,
                USE_HCOUNTER,
                HUGE,
                ALIGNED,
                IDXB,
                FRAC,
                NB_LOG2,
                SEC,
                CHUNK,
                True,
            )
        else:
            _apply_body(
                ttab,
                T,
                t,
                ws,
                sst,
                S,
                stab,
                cand,
                zcount,
                c,
                seg,
                p_ptr,
                m_ptr,
                v_ptr,
                start,
                lstart,
                n,
                grad_scale_ptr,
                eps,
                decay,
                hash_counter,
                PDT,
                MDT,
                KEY_MODE,
                HAS_SCALE,
                DECAY,
                USE_HCOUNTER,
                HUGE,
                ALIGNED,
                IDXB,
                FRAC,
                NB_LOG2,
                SEC,
                CHUNK,
                False,
            )
