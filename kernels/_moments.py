"""Pass 1 of the exact top-k path: moments for every entry + first radix histogram.

One program per chunk of ``ctab``. It updates m and v for all entries (reads g, m, v; writes
m, v: 20 B/param in fp32) and, in the same pass, histograms the top ``BITS`` bits of the
composite key of every entry into its segment's row of ``hist`` (local ``tl.histogram``,
then one relaxed atomic add per non-empty bin).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    C_LEN, C_SEG, C_START, C_TENSOR, ROW_G, ROW_HKEY, ROW_M, ROW_V, WS_T,
    abs_key, hash_u, load_grad, skip_step, stream_key,
)


@triton.jit
def _moments_body(
    ttab, T, t, ws, hist, seg, g_ptr, m_ptr, v_ptr, start, n, grad_scale_ptr,
    beta1, omb1, beta2, omb2, hash_counter,
    KEY_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, USE_HCOUNTER: tl.constexpr, HUGE: tl.constexpr,
    KEY_SHIFT: tl.constexpr, BITS: tl.constexpr, CHUNK: tl.constexpr,
):
    lane = tl.arange(0, CHUNK)
    offs = start + lane
    mask = lane < n

    g = load_grad(g_ptr, offs, mask, grad_scale_ptr, HAS_SCALE)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    m = beta1 * m + omb1 * g
    v = beta2 * v + omb2 * g * g
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)

    if KEY_MODE == 0:
        key = abs_key(m)
    elif KEY_MODE == 1:
        key = abs_key(g)
    else:
        if USE_HCOUNTER:
            counter = (tl.zeros([], tl.int64) + hash_counter)
        else:
            counter = tl.load(ws + WS_T * T + t).to(tl.int64)
        skey = stream_key(tl.load(ttab + ROW_HKEY * T + t), counter)
        key = hash_u(offs, skey, HUGE)
    digit = (key >> KEY_SHIFT).to(tl.int32)
    h = tl.histogram(digit, 1 << BITS, mask=mask)
    bins = tl.arange(0, 1 << BITS)
    tl.atomic_add(hist + seg * (1 << BITS) + bins, h, mask=h > 0, sem="relaxed")


@triton.jit
def moments_hist_kernel(
    ttab, T, ctab, C, ws, hist, found_inf_ptr, grad_scale_ptr,
    beta1, omb1, beta2, omb2, hash_counter,
    PDT: tl.constexpr, KEY_MODE: tl.constexpr, HAS_INF: tl.constexpr, HAS_SCALE: tl.constexpr,
    USE_HCOUNTER: tl.constexpr, HUGE: tl.constexpr, ALIGNED: tl.constexpr,
    KEY_SHIFT: tl.constexpr, BITS: tl.constexpr, CHUNK: tl.constexpr,
):
    if skip_step(found_inf_ptr, HAS_INF):
        return
    c = tl.program_id(0)
    t = tl.load(ctab + C_TENSOR * C + c)
    start = tl.load(ctab + C_START * C + c)
    n = tl.load(ctab + C_LEN * C + c)
    seg = tl.load(ctab + C_SEG * C + c)
    g_ptr = tl.load(ttab + ROW_G * T + t).to(tl.pointer_type(PDT))
    m_ptr = tl.load(ttab + ROW_M * T + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(ttab + ROW_V * T + t).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # see dense_step_kernel: 128-bit accesses on full chunks
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        start = tl.multiple_of(start, 16)
        if n == CHUNK:
            _moments_body(ttab, T, t, ws, hist, seg, g_ptr, m_ptr, v_ptr, start, CHUNK, grad_scale_ptr,
                          beta1, omb1, beta2, omb2, hash_counter,
                          KEY_MODE, HAS_SCALE, USE_HCOUNTER, HUGE, KEY_SHIFT, BITS, CHUNK)
            return
    _moments_body(ttab, T, t, ws, hist, seg, g_ptr, m_ptr, v_ptr, start, n, grad_scale_ptr,
                  beta1, omb1, beta2, omb2, hash_counter,
                  KEY_MODE, HAS_SCALE, USE_HCOUNTER, HUGE, KEY_SHIFT, BITS, CHUNK)
