"""Single-pass kernel for selections that need no global statistics.

``MODE == 0``: every entry (plain AdamW, HalfAdam's active tensors).
``MODE == 1``: RandomBCD, entry i selected iff u(i) < threshold(alpha), the hash computed
in-register from (seed, tensor index, counter, flat index); no mask is stored.

One program per chunk of ``ctab``; reads g, m, v, p and writes m, v and p (p only where
selected, unless decay applies to every entry).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    C_LEN,
    C_START,
    C_TENSOR,
    WS_BC2_SQRT,
    WS_STEP_SIZE,
    adam_update,
    as_param,
    hash_key_of,
    skip_step,
    step_moments,
    tensor_pointers,
)


@triton.jit
def _dense_body(
    ttab,
    T,
    t,
    ws,
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    start,
    n,
    grad_scale_ptr,
    beta1,
    omb1,
    beta2,
    omb2,
    eps,
    decay,
    hash_counter,
    threshold,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DECAY: tl.constexpr,
    USE_HCOUNTER: tl.constexpr,
    HUGE: tl.constexpr,
    SEC: tl.constexpr,
    CHUNK: tl.constexpr,
    FULL: tl.constexpr,
):
    # rows of SEC entries, one 32-byte sector of p: RandomBCD reads and writes p for whole
    # sectors holding a selected entry, so its accesses stay 128-bit wide
    R: tl.constexpr = CHUNK // SEC
    cols = tl.arange(0, SEC)[None, :]
    lane = tl.arange(0, R)[:, None] * SEC + cols
    offs = start + lane
    if FULL:  # a constant mask keeps the accesses vectorised
        mask = tl.full([R, SEC], 1, tl.int1)
    else:
        mask = lane < n

    g, m, v = step_moments(
        g_ptr, m_ptr, v_ptr, offs, mask, grad_scale_ptr, beta1, omb1, beta2, omb2, HAS_SCALE, MDT
    )

    if MODE == 0:
        sel = mask
        pmask = mask
    else:
        u = hash_key_of(ttab, T, t, ws, offs, hash_counter, USE_HCOUNTER, HUGE)
        sel = mask & (u.to(tl.int64) < threshold)
        if DECAY == 2:
            pmask = mask
        else:
            pmask = mask & (tl.max(sel.to(tl.int32), axis=1) > 0)[:, None] & (cols < SEC)

    step_size = tl.load(ws + WS_STEP_SIZE * T + t)
    bc2_sqrt = tl.load(ws + WS_BC2_SQRT * T + t)
    p = tl.load(p_ptr + offs, mask=pmask, other=0.0).to(tl.float32)
    p = adam_update(p, m, v, step_size, bc2_sqrt, eps, decay, sel, DECAY)
    tl.store(p_ptr + offs, as_param(p, PDT), mask=pmask)


@triton.jit
def dense_step_kernel(
    ttab,
    T,
    ctab,
    C,
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
    threshold,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    MODE: tl.constexpr,
    HAS_INF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DECAY: tl.constexpr,
    USE_HCOUNTER: tl.constexpr,
    HUGE: tl.constexpr,
    ALIGNED: tl.constexpr,
    SEC: tl.constexpr,
    CHUNK: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_INF):
        return
    c = tl.program_id(0)
    t = tl.load(ctab + C_TENSOR * C + c)
    start = tl.load(ctab + C_START * C + c)
    n = tl.load(ctab + C_LEN * C + c)
    p_ptr, g_ptr, m_ptr, v_ptr = tensor_pointers(ttab, T, t, PDT, MDT, ALIGNED)
    if ALIGNED:
        start = tl.multiple_of(start, 16)
        if n == CHUNK:
            _dense_body(
                ttab,
                T,
                t,
                ws,
                p_ptr,
                g_ptr,
                m_ptr,
                v_ptr,
                start,
                CHUNK,
                grad_scale_ptr,
                beta1,
                omb1,
                beta2,
                omb2,
                eps,
                decay,
                hash_counter,
                threshold,
                PDT,
                MDT,
                MODE,
                HAS_SCALE,
                DECAY,
                USE_HCOUNTER,
                HUGE,
                SEC,
                CHUNK,
                True,
            )
            return
    _dense_body(
        ttab,
        T,
        t,
        ws,
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        start,
        n,
        grad_scale_ptr,
        beta1,
        omb1,
        beta2,
        omb2,
        eps,
        decay,
        hash_counter,
        threshold,
        PDT,
        MDT,
        MODE,
        HAS_SCALE,
        DECAY,
        USE_HCOUNTER,
        HUGE,
        SEC,
        CHUNK,
        False,
    )
