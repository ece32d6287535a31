"""Last pass of the exact top-k path: the masked Adam update.

One program per chunk. It re-reads the key (|m| for the momentum filter, |g| for the
gradient filter, the hash for exact RandomBCD), selects ``composite >= thr[segment]`` and
reads v and p / writes p only where selected (everywhere for p when weight decay is not
masked). Entries outside the selection are not written at all.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    C_LEN, C_SEG, C_SEGOFF, C_START, C_TENSOR, ROW_M, ROW_P, ROW_V, S_THR,
    WS_BC2_SQRT, WS_STEP_SIZE,
    adam_update, skip_step,
)
from ._select import composite, load_key


@triton.jit
def _apply_body(
    ttab, T, t, ws, p_ptr, m_ptr, v_ptr, start, lstart, n, thr, grad_scale_ptr, eps, decay, hash_counter,
    PDT: tl.constexpr, KEY_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, DECAY: tl.constexpr,
    USE_HCOUNTER: tl.constexpr, HUGE: tl.constexpr, ALIGNED: tl.constexpr, IDXB: tl.constexpr,
    CHUNK: tl.constexpr,
):
    lane = tl.arange(0, CHUNK)
    offs = start + lane
    mask = lane < n
    if KEY_MODE == 0:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        key = m.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        sel = mask & (composite(key, lstart + lane, IDXB) >= thr)
    else:
        key = load_key(ttab, T, t, ws, offs, mask, grad_scale_ptr, hash_counter,
                       PDT, KEY_MODE, HAS_SCALE, USE_HCOUNTER, HUGE, ALIGNED)
        sel = mask & (composite(key, lstart + lane, IDXB) >= thr)
        m = tl.load(m_ptr + offs, mask=sel, other=0.0)
    v = tl.load(v_ptr + offs, mask=sel, other=0.0)
    if DECAY == 2:
        pmask = mask
    else:
        pmask = sel
    p = tl.load(p_ptr + offs, mask=pmask, other=0.0).to(tl.float32)
    step_size = tl.load(ws + WS_STEP_SIZE * T + t)
    bc2_sqrt = tl.load(ws + WS_BC2_SQRT * T + t)
    p = adam_update(p, m, v, step_size, bc2_sqrt, eps, decay, sel, DECAY)
    tl.store(p_ptr + offs, p.to(PDT), mask=pmask)


@triton.jit
def apply_kernel(
    ttab, T, ctab, C, ws, sst, S, found_inf_ptr, grad_scale_ptr, eps, decay, hash_counter,
    PDT: tl.constexpr, KEY_MODE: tl.constexpr, HAS_INF: tl.constexpr, HAS_SCALE: tl.constexpr,
    DECAY: tl.constexpr, USE_HCOUNTER: tl.constexpr, HUGE: tl.constexpr, ALIGNED: tl.constexpr,
    IDXB: tl.constexpr, CHUNK: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_INF):
        return
    c = tl.program_id(0)
    t = tl.load(ctab + C_TENSOR * C + c)
    start = tl.load(ctab + C_START * C + c)
    n = tl.load(ctab + C_LEN * C + c)
    seg = tl.load(ctab + C_SEG * C + c)
    lstart = start - tl.load(ctab + C_SEGOFF * C + c)
    thr = tl.load(sst + S_THR * S + seg)
    p_ptr = tl.load(ttab + ROW_P * T + t).to(tl.pointer_type(PDT))
    m_ptr = tl.load(ttab + ROW_M * T + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(ttab + ROW_V * T + t).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # see dense_step_kernel: 128-bit accesses on full chunks
        p_ptr = tl.multiple_of(p_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        start = tl.multiple_of(start, 16)
        if n == CHUNK:
            _apply_body(ttab, T, t, ws, p_ptr, m_ptr, v_ptr, start, lstart, CHUNK, thr, grad_scale_ptr,
                        eps, decay, hash_counter,
                        PDT, KEY_MODE, HAS_SCALE, DECAY, USE_HCOUNTER, HUGE, ALIGNED, IDXB, CHUNK)
            return
    _apply_body(ttab, T, t, ws, p_ptr, m_ptr, v_ptr, start, lstart, n, thr, grad_scale_ptr,
                eps, decay, hash_counter,
                PDT, KEY_MODE, HAS_SCALE, DECAY, USE_HCOUNTER, HUGE, ALIGNED, IDXB, CHUNK)
