"""Single-pass exact top-k for short segments (``block_size`` blocks, small tensors).

A program holds ``ROWS`` whole segments of up to ``BB`` entries in registers: it updates the
moments, finds each row's k-th largest key by a bitwise binary search (``KEYBITS``
reductions), takes the entries equal to it in index order with a row cumsum (lowest-index
tie rule), and writes p where selected. Same bytes as one AdamW pass, less the p traffic of
the unselected entries.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    L_K,
    L_LEN,
    L_START,
    L_TENSOR,
    ROW_G,
    ROW_M,
    ROW_P,
    ROW_V,
    WS_BC2_SQRT,
    WS_STEP_SIZE,
    abs_key,
    adam_update,
    as_param,
    hash_key_of,
    skip_step,
    step_moments,
)


@triton.jit
def local_step_kernel(
    ttab,
    T,
    ltab,
    SL,
    ws,
    found_inf_ptr,
    grad_scale_ptr,
    beta1,
    omb1,
    beta2,
    omb2,
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
    KEYBITS: tl.constexpr,
    ROWS: tl.constexpr,
    BB: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_INF):
        return
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < SL
    t = tl.load(ltab + L_TENSOR * SL + rows, mask=rmask, other=0)
    start = tl.load(ltab + L_START * SL + rows, mask=rmask, other=0)
    n = tl.load(ltab + L_LEN * SL + rows, mask=rmask, other=0)
    k = tl.load(ltab + L_K * SL + rows, mask=rmask, other=0)
    p_ptr = tl.load(ttab + ROW_P * T + t, mask=rmask, other=0).to(tl.pointer_type(PDT))
    g_ptr = tl.load(ttab + ROW_G * T + t, mask=rmask, other=0).to(tl.pointer_type(PDT))
    m_ptr = tl.load(ttab + ROW_M * T + t, mask=rmask, other=0).to(tl.pointer_type(MDT))
    v_ptr = tl.load(ttab + ROW_V * T + t, mask=rmask, other=0).to(tl.pointer_type(MDT))
    step_size = tl.load(ws + WS_STEP_SIZE * T + t, mask=rmask, other=0.0)
    bc2_sqrt = tl.load(ws + WS_BC2_SQRT * T + t, mask=rmask, other=1.0)

    cols = tl.arange(0, BB)
    mask = cols[None, :] < n[:, None]
    offs = start[:, None] + cols[None, :]

    g, m, v = step_moments(
        g_ptr[:, None],
        m_ptr[:, None],
        v_ptr[:, None],
        offs,
        mask,
        grad_scale_ptr,
        beta1,
        omb1,
        beta2,
        omb2,
        HAS_SCALE,
        MDT,
    )

    if KEY_MODE == 0:
        key = abs_key(m).to(tl.int32, bitcast=True)
    elif KEY_MODE == 1:
        key = abs_key(g).to(tl.int32, bitcast=True)
    else:
        key = hash_key_of(ttab, T, t[:, None], ws, offs, hash_counter, USE_HCOUNTER, HUGE).to(tl.int64)
    key = tl.where(mask, key, -1)

    # k-th largest key per row: the largest x with #(key >= x) >= k, bit by bit from the top
    if KEYBITS == 31:
        thr = tl.zeros([ROWS], tl.int32)
        one = tl.full([], 1, tl.int32)
    else:
        thr = tl.zeros([ROWS], tl.int64)
        one = tl.full([], 1, tl.int64)
    for b in range(KEYBITS - 1, -1, -1):  # a runtime loop: unrolled, it spills registers
        cand = thr | (one << b)
        cnt = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
        thr = tl.where(cnt >= k, cand, thr)
    above = key > thr[:, None]
    eq = key == thr[:, None]
    r = k - tl.sum(above.to(tl.int32), axis=1)
    sel = above | (eq & (tl.cumsum(eq.to(tl.int32), axis=1) <= r[:, None]))

    if DECAY == 2:
        pmask = mask
    else:
        pmask = sel
    p = tl.load(p_ptr[:, None] + offs, mask=pmask, other=0.0).to(tl.float32)
    p = adam_update(p, m, v, step_size[:, None], bc2_sqrt[:, None], eps, decay, sel, DECAY)
    tl.store(p_ptr[:, None] + offs, as_param(p, PDT), mask=pmask)
