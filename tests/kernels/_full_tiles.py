"""Kernels that run only the full-tile bodies of pass 2 and RandomBCD's pass, so that a compile
check sees the accesses of a full chunk without the tail path beside them. Addresses and the
start come from a table, as in the real kernels (alignment hints on loaded values hold; on
kernel arguments the compiler's own specialisation decides)."""

import triton
import triton.language as tl

from maskopt.kernels._apply import _apply_body
from maskopt.kernels._dense import _dense_body


@triton.jit
def _addresses(tab, PDT: tl.constexpr, MDT: tl.constexpr):
    p_ptr = tl.multiple_of(tl.load(tab).to(tl.pointer_type(PDT)), 16)
    g_ptr = tl.multiple_of(tl.load(tab + 1).to(tl.pointer_type(PDT)), 16)
    m_ptr = tl.multiple_of(tl.load(tab + 2).to(tl.pointer_type(MDT)), 16)
    v_ptr = tl.multiple_of(tl.load(tab + 3).to(tl.pointer_type(MDT)), 16)
    start = tl.multiple_of(tl.load(tab + 4), 16)
    return p_ptr, g_ptr, m_ptr, v_ptr, start


@triton.jit
def apply_full_tile(
    tab,
    ttab,
    T,
    ws,
    sst,
    S,
    stab,
    cand,
    zcount,
    grad_scale_ptr,
    eps,
    decay,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    KEY_MODE: tl.constexpr,
    DECAY: tl.constexpr,
    SEC: tl.constexpr,
    CHUNK: tl.constexpr,
):
    p_ptr, g_ptr, m_ptr, v_ptr, start = _addresses(tab, PDT, MDT)
    _apply_body(
        ttab,
        T,
        0,
        ws,
        sst,
        S,
        stab,
        cand,
        zcount,
        0,
        0,
        p_ptr,
        m_ptr,
        v_ptr,
        start,
        start,
        CHUNK,
        grad_scale_ptr,
        eps,
        decay,
        0,
        PDT,
        MDT,
        KEY_MODE,
        False,
        DECAY,
        False,
        False,
        True,
        31 if KEY_MODE == 2 else 32,
        5,
        9,
        SEC,
        CHUNK,
        True,
    )


@triton.jit
def dense_full_tile(
    tab,
    ttab,
    T,
    ws,
    grad_scale_ptr,
    eps,
    decay,
    threshold,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    DECAY: tl.constexpr,
    SEC: tl.constexpr,
    CHUNK: tl.constexpr,
):
    p_ptr, g_ptr, m_ptr, v_ptr, start = _addresses(tab, PDT, MDT)
    _dense_body(
        ttab,
        T,
        0,
        ws,
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        start,
        CHUNK,
        grad_scale_ptr,
        0.9,
        0.1,
        0.999,
        0.001,
        eps,
        decay,
        5,
        threshold,
        PDT,
        MDT,
        1,
        False,
        DECAY,
        True,
        False,
        SEC,
        CHUNK,
        True,
    )
