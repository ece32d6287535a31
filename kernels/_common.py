"""Shared Triton helpers and table layouts for the fused maskopt kernels.

Layouts (all tables are int64 device tensors built by ``launch.py``):

* tensor table ``ttab`` [N_TROWS, T]: per tensor the addresses of param, grad, exp_avg,
  exp_avg_sq and step, its numel, the part of the RandomBCD stream key that does not
  depend on the step (``mix32(mix32(fold(seed) ^ S1) ^ tensor_index ^ S2)``) and the global
  flat index of its first local entry (a shard's offset under FSDP2, else 0).
* workspace ``ws`` (fp32) [N_WSROWS, T]: written by the prologue kernel: ``lr / (1 - beta1^t)``,
  ``sqrt(1 - beta2^t)`` and the new step t.
* chunk table ``ctab`` [N_CROWS, C]: one row per program of the streaming kernels:
  tensor, start offset in the tensor, length (<= CHUNK), selection segment, segment start.
* segment table ``stab`` [N_GROWS, S]: per selection segment of the two-pass path its k,
  candidate capacity and region offset, tensor, start, length and chunk range (``G_*``).
* segment state ``sst`` [N_SROWS, S]: kept on the device between steps: the mode of this
  step's selection, the boundary digit, the rank left, the threshold, the candidate count
  and the window centre (``S_*``).
* candidate buffer ``cand`` (int64): the composite keys of the boundary bin's entries,
  compacted by pass 2 for the resolve.

Moments are fp32 or bf16 (``MDT``); arithmetic is fp32, and the moments are rounded to their
dtype as soon as they are computed, so the selection and the update read what is stored.

Selection order: entry i of a segment has the 63-bit composite key
``(key(i) << IDXB) | (IDXMASK - i)`` with ``key`` the magnitude bits (31 bits for |x| of an
fp32, 32 bits for RandomBCD's hash ``u``) and ``i`` the index inside the segment. Composite
keys are distinct, so "the k largest composite keys" is exactly "the k largest keys, ties
at the k-th value broken by lowest index". The selection of a segment is ``composite >= thr``
for its k-th largest composite ``thr``; the window histogram of pass 1 finds the bin that
holds it, and the resolve (or the fallback) finds it inside that bin.
"""

from __future__ import annotations

import triton
import triton.language as tl

# tensor table rows
ROW_P = tl.constexpr(0)
ROW_G = tl.constexpr(1)
ROW_M = tl.constexpr(2)
ROW_V = tl.constexpr(3)
ROW_STEP = tl.constexpr(4)
ROW_NUMEL = tl.constexpr(5)
ROW_HKEY = tl.constexpr(6)
ROW_BASE = tl.constexpr(7)  # global flat index of the first local entry (a shard's offset; else 0)
N_TROWS = 8

# workspace rows (fp32)
WS_STEP_SIZE = tl.constexpr(0)
WS_BC2_SQRT = tl.constexpr(1)
WS_T = tl.constexpr(2)
N_WSROWS = 3

# chunk table rows
C_TENSOR = tl.constexpr(0)
C_START = tl.constexpr(1)
C_LEN = tl.constexpr(2)
C_SEG = tl.constexpr(3)
C_SEGOFF = tl.constexpr(4)
N_CROWS = 5

# local (single-pass) segment table rows
L_TENSOR = tl.constexpr(0)
L_START = tl.constexpr(1)
L_LEN = tl.constexpr(2)
L_K = tl.constexpr(3)
N_LROWS = 4

# segment table rows (int64, per plan)
G_K = tl.constexpr(0)  # k of the segment
G_CAP = tl.constexpr(1)  # candidate capacity
G_COFF = tl.constexpr(2)  # offset of its candidate region
G_TENSOR = tl.constexpr(3)
G_START = tl.constexpr(4)  # first entry of the segment in its tensor
G_LEN = tl.constexpr(5)
G_CFIRST = tl.constexpr(6)  # its first chunk in the chunk table
G_NCHUNKS = tl.constexpr(7)
N_GROWS = 8

# segment state rows (int64, kept on the device between steps)
S_MODE = tl.constexpr(0)  # how pass 2 selects (MODE_*), set by the window select
S_DSEL = tl.constexpr(1)  # entries whose window digit is above this one are selected
S_R = tl.constexpr(2)  # entries still to take from the boundary (bucket, zeros or candidates)
S_THR = tl.constexpr(3)  # the k-th largest composite key (MODE_EXACT, and after the resolve)
S_CCOUNT = tl.constexpr(4)  # candidates compacted by pass 2
S_CENTER = tl.constexpr(5)  # window centre: fine key of the last threshold
# sharded segments only: the digits fixed so far by the level-by-level selects, whether the
# threshold is found, and the zeros that lie on the ranks before this one
S_PREFIX = tl.constexpr(6)
S_DONE = tl.constexpr(7)
S_ZBASE = tl.constexpr(8)
N_SROWS = 9

# segment modes
MODE_WINDOW = tl.constexpr(0)  # boundary in a window bin: its entries are candidates
MODE_DIGIT = tl.constexpr(1)  # the boundary bin is taken whole: digit > dsel is the selection
MODE_ZERO = tl.constexpr(2)  # boundary is |key| == 0: the first r zeros by index complete it
MODE_EXACT = tl.constexpr(3)  # window miss or overflow: the threshold comes from the fallback

# key modes
KEY_MOMENTUM = 0
KEY_GRADIENT = 1
KEY_HASH = 2

# decay modes
DECAY_NONE = 0
DECAY_MASKED = 1
DECAY_ALL = 2

# hash constants (maskopt/_hash.py is the definition)
SALT_COUNTER = tl.constexpr(0x13198A2E)
GOLDEN32 = tl.constexpr(0x9E3779B9)


@triton.jit
def mix32(x):
    """lowbias32 on uint32 (wrapping arithmetic)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def stream_key(hkey, counter):
    """mix32(hkey ^ counter ^ SALT) with hkey, counter int64 in [0, 2**32)."""
    k = (hkey ^ (counter & 0xFFFFFFFF) ^ SALT_COUNTER).to(tl.uint32)
    return mix32(k)


@triton.jit
def hash_u(idx, skey, HUGE: tl.constexpr):
    """u(i) of maskopt/_hash.py for int64 flat indices ``idx``; returns uint32."""
    lo = idx.to(tl.uint32)
    u = mix32(lo * GOLDEN32 + skey)
    if HUGE:
        u = u ^ mix32((idx >> 32).to(tl.uint32))
    return u


@triton.jit
def abs_key(x):
    """Bits of |x| for fp32 x as uint32: orders like |x|, and every NaN is the one key just
    above inf (maskopt.selection.magnitude_keys), so NaN ranks largest and NaNs tie."""
    return tl.minimum(x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, 0x7F800001)


@triton.jit
def skip_step(found_inf_ptr, HAS_INF: tl.constexpr):
    if HAS_INF:
        return tl.load(found_inf_ptr) != 0
    else:
        return False


@triton.jit
def load_grad(g_ptr, offs, mask, grad_scale_ptr, HAS_SCALE: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale_ptr))
    return g


@triton.jit
def adam_update(p, m, v, step_size, bc2_sqrt, eps, decay, sel, DECAY: tl.constexpr):
    """New fp32 parameter values: decoupled decay then the Adam step on ``sel``.

    IEEE division and square root (``/`` and ``tl.sqrt`` compile to approximations that flush
    subnormals), and every launch disables contraction (``launch.LAUNCH_OPTIONS``): each
    operation is rounded once, to nearest even, as under the interpreter (docs/kernels.md)."""
    if DECAY == 2:
        p = p * decay
    elif DECAY == 1:
        p = tl.where(sel, p * decay, p)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    return tl.where(sel, p - step_size * tl.div_rn(m, denom), p)


@triton.jit
def rounded_to(x, MDT: tl.constexpr):
    """fp32 ``x`` rounded to the moments' dtype (nearest even, NaN kept), still as fp32.

    Done on the bits because the Triton interpreter truncates float casts; this gives the
    bits of torch's ``.to(torch.bfloat16)`` on the GPU and under the interpreter alike."""
    if MDT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return tl.where(nan, (bits | 0x00400000) & 0xFFFF0000, up).to(tl.float32, bitcast=True)
    else:
        return x


@triton.jit
def as_moment(x, MDT: tl.constexpr):
    """A value from :func:`rounded_to`, in the moments' dtype for a store (exact)."""
    if MDT == tl.bfloat16:
        return (x.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x


@triton.jit
def as_param(x, PDT: tl.constexpr):
    """fp32 ``x`` in the parameter dtype for a store, rounded to nearest even: a bf16 cast is
    done on the bits because the interpreter truncates it where the GPU rounds (fp16 casts
    round to nearest even on both)."""
    if PDT == tl.bfloat16:
        return as_moment(rounded_to(x, tl.bfloat16), tl.bfloat16)
    else:
        return x.to(PDT)


@triton.jit
def adam_moments(g, m, v, beta1, omb1, beta2, omb2, MDT: tl.constexpr):
    """Adam's moment update in fp32, rounded to the moments' dtype: the selection and the
    update read what is stored. Each product and the sum are rounded separately (the launches
    disable contraction into a fused multiply-add), on the GPU as under the interpreter."""
    return rounded_to(beta1 * m + omb1 * g, MDT), rounded_to(beta2 * v + omb2 * g * g, MDT)


@triton.jit
def tensor_pointers(ttab, T, t, PDT: tl.constexpr, MDT: tl.constexpr, ALIGNED: tl.constexpr):
    """Addresses of tensor ``t``'s p, g, m and v, with 16-byte alignment hints when ALIGNED
    (128-bit accesses on full chunks)."""
    p_ptr = tl.load(ttab + ROW_P * T + t).to(tl.pointer_type(PDT))
    g_ptr = tl.load(ttab + ROW_G * T + t).to(tl.pointer_type(PDT))
    m_ptr = tl.load(ttab + ROW_M * T + t).to(tl.pointer_type(MDT))
    v_ptr = tl.load(ttab + ROW_V * T + t).to(tl.pointer_type(MDT))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    return p_ptr, g_ptr, m_ptr, v_ptr


@triton.jit
def update_candidates(
    ttab,
    T,
    ws,
    t,
    seg_start,
    region,
    lo,
    hi,
    thr,
    eps,
    decay,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    DECAY: tl.constexpr,
    IDXB: tl.constexpr,
    TILE: tl.constexpr,
):
    """Candidates ``[lo, hi)`` of a segment's region (of tensor ``t``, from ``seg_start``):
    those at or above the composite threshold ``thr`` take the step. Pass 2 left every
    candidate alone, so that each parameter is rounded once: when every entry decays
    (``DECAY == 2``) all of them decay here."""
    lane = tl.arange(0, TILE)
    p_ptr, _, m_ptr, v_ptr = tensor_pointers(ttab, T, t, PDT, MDT, False)
    step_size = tl.load(ws + WS_STEP_SIZE * T + t)
    bc2_sqrt = tl.load(ws + WS_BC2_SQRT * T + t)
    for j in range(lo, hi, TILE):
        cmask = j + lane < hi
        comp = tl.load(region + j + lane, mask=cmask, other=0)
        sel = cmask & (comp >= thr)
        offs = seg_start + (((1 << IDXB) - 1) - (comp & ((1 << IDXB) - 1)))
        if DECAY == 2:
            pmask = cmask
        else:
            pmask = sel
        m = tl.load(m_ptr + offs, mask=sel, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=sel, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=pmask, other=0.0).to(tl.float32)
        p = adam_update(p, m, v, step_size, bc2_sqrt, eps, decay, sel, DECAY)
        tl.store(p_ptr + offs, as_param(p, PDT), mask=pmask)


@triton.jit
def step_moments(
    g_ptr,
    m_ptr,
    v_ptr,
    offs,
    mask,
    grad_scale_ptr,
    beta1,
    omb1,
    beta2,
    omb2,
    HAS_SCALE: tl.constexpr,
    MDT: tl.constexpr,
):
    """Read g, m and v, store Adam's new moments; returns g, m, v in fp32 (m and v as stored)."""
    g = load_grad(g_ptr, offs, mask, grad_scale_ptr, HAS_SCALE)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m, v = adam_moments(g, m, v, beta1, omb1, beta2, omb2, MDT)
    tl.store(m_ptr + offs, as_moment(m, MDT), mask=mask)
    tl.store(v_ptr + offs, as_moment(v, MDT), mask=mask)
    return g, m, v


@triton.jit
def digit_histogram(comp, mask, prefix, shift):
    """Histogram of the 8-bit digit at ``shift`` of the composite keys whose higher digits
    equal ``prefix``."""
    match = mask & (((comp >> shift) >> 8) == prefix)
    return tl.histogram(((comp >> shift) & 255).to(tl.int32), 256, mask=match)


@triton.jit
def candidate_histogram(region, count, prefix, shift, TILE: tl.constexpr):
    """:func:`digit_histogram` over the ``count`` compacted candidates at ``region``."""
    lane = tl.arange(0, TILE)
    acc = tl.zeros([256], tl.int32)
    for j in range(0, count, TILE):
        cmask = j + lane < count
        acc += digit_histogram(tl.load(region + j + lane, mask=cmask, other=0), cmask, prefix, shift)
    return acc


@triton.jit
def hash_key_of(ttab, T, t, ws, offs, hash_counter, USE_HCOUNTER: tl.constexpr, HUGE: tl.constexpr):
    """RandomBCD's u(i) (uint32) for entries ``offs`` of tensor ``t`` at this step."""
    if USE_HCOUNTER:
        counter = tl.zeros([], tl.int64) + hash_counter
    else:
        counter = tl.load(ws + WS_T * T + t).to(tl.int64)
    skey = stream_key(tl.load(ttab + ROW_HKEY * T + t), counter)
    return hash_u(offs + tl.load(ttab + ROW_BASE * T + t), skey, HUGE)


@triton.jit
def load_key(
    ttab,
    T,
    t,
    ws,
    offs,
    mask,
    grad_scale_ptr,
    hash_counter,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    KEY_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    USE_HCOUNTER: tl.constexpr,
    HUGE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """The selection key (uint32) of entries ``offs`` of tensor ``t``, after the moment update."""
    if KEY_MODE == 0:
        m_ptr = tl.load(ttab + ROW_M * T + t).to(tl.pointer_type(MDT))
        if ALIGNED:
            m_ptr = tl.multiple_of(m_ptr, 16)
        key = abs_key(tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    elif KEY_MODE == 1:
        g_ptr = tl.load(ttab + ROW_G * T + t).to(tl.pointer_type(PDT))
        if ALIGNED:
            g_ptr = tl.multiple_of(g_ptr, 16)
        key = abs_key(load_grad(g_ptr, offs, mask, grad_scale_ptr, HAS_SCALE))
    else:
        key = hash_key_of(ttab, T, t, ws, offs, hash_counter, USE_HCOUNTER, HUGE)
    return key


@triton.jit
def composite(key, local_idx, IDXB: tl.constexpr):
    """The distinct 63-bit order key: larger key first, then lower index first."""
    return (key.to(tl.int64) << IDXB) | (((1 << IDXB) - 1) - local_idx.to(tl.int64))


@triton.jit
def window_digit(key, base, FLOAT_KEY: tl.constexpr, FRAC: tl.constexpr, NB_LOG2: tl.constexpr):
    """Pass 1's histogram bin of a key; monotone in the key.

    Float keys: bin 0 holds |x| == 0 exactly, bin 1 everything below the window (and its first
    fine value), bin NB-1 everything above it, bins 2..NB-2 one fine value each: the exponent
    and the top FRAC mantissa bits, ``fine - base``. Hash keys are uniform: their top NB_LOG2
    bits, no window."""
    NB: tl.constexpr = 1 << NB_LOG2
    if FLOAT_KEY:
        fine = (key >> (23 - FRAC)).to(tl.int32)
        d = tl.minimum(tl.maximum(fine - base, 1), NB - 1)
        d = tl.where(key == 0, 0, d)
    else:
        d = (key >> (32 - NB_LOG2)).to(tl.int32)
    return d


@triton.jit
def pick_bin(h, bins, r):
    """The bin holding the r-th largest entry of histogram ``h`` (int64, bins ascending), the
    rank left inside it and its population."""
    total = tl.sum(h, axis=0)
    gt = total - tl.cumsum(h, axis=0)  # entries in higher bins
    b = tl.max(tl.where(gt + h >= r, bins, -1), axis=0)
    gt_b = tl.sum(tl.where(bins == b, gt, 0), axis=0)
    h_b = tl.sum(tl.where(bins == b, h, 0), axis=0)
    return b, r - gt_b, h_b


@triton.jit
def radix_digit(h, r, prefix, shift):
    """One 8-bit digit of a radix select on composite keys: from the histogram ``h`` (256 bins)
    of the digit at ``shift`` among the keys matching ``prefix``, the rank left, the prefix
    with this digit, whether the r-th largest key is found (the rank left is its bucket's
    population, or the last digit is reached) and, then, that key."""
    b, r, h_b = pick_bin(h.to(tl.int64), tl.arange(0, 256), r)
    prefix = (prefix << 8) | b.to(tl.int64)
    return r, prefix, (r == h_b) | (shift == 0), prefix << shift


@triton.jit
def key_digit_histogram(
    ttab,
    T,
    t,
    ws,
    start,
    lstart,
    n,
    prefix,
    shift,
    grad_scale_ptr,
    hash_counter,
    PDT: tl.constexpr,
    MDT: tl.constexpr,
    KEY_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    USE_HCOUNTER: tl.constexpr,
    HUGE: tl.constexpr,
    IDXB: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """:func:`digit_histogram` of the keys of ``n`` (<= CHUNK) entries of tensor ``t`` from
    ``start``, whose composite indices start at ``lstart``."""
    lane = tl.arange(0, CHUNK)
    mask = lane < n
    key = load_key(
        ttab,
        T,
        t,
        ws,
        start + lane,
        mask,
        grad_scale_ptr,
        hash_counter,
        PDT,
        MDT,
        KEY_MODE,
        HAS_SCALE,
        USE_HCOUNTER,
        HUGE,
        False,
    )
    return digit_histogram(composite(key, lstart + lane, IDXB), mask, prefix, shift)


@triton.jit
def chunk_range(per_program, C):
    """The chunks ``[c0, c1)`` of this program of a persistent grid."""
    c0 = tl.program_id(0) * per_program
    return c0, tl.minimum(c0 + per_program, C)


@triton.jit
def flush_histogram(hist, row, acc, when, NB: tl.constexpr):
    """Add a program's histogram ``acc`` to row ``row`` of ``hist`` when ``when`` holds
    (persistent programs flush when their segment changes)."""
    tl.atomic_add(
        hist + tl.maximum(row, 0) * NB + tl.arange(0, NB), acc, mask=(acc > 0) & when, sem="relaxed"
    )


@triton.jit
def window_base(sst, S, s, NB_LOG2: tl.constexpr):
    """The fine key of window bin 0 of segment ``s``: its centre less half the bins."""
    return tl.load(sst + S_CENTER * S + s) - ((1 << NB_LOG2) // 2)


@triton.jit
def prologue_kernel(
    ttab,
    T,
    ws,
    found_inf_ptr,
    b1_hi,
    b1_lo,
    b2_hi,
    b2_lo,
    lr_hi,
    lr_lo,
    HAS_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Increment every step counter and compute the per-tensor bias corrections in fp64."""
    if skip_step(found_inf_ptr, HAS_INF):
        return
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < T
    sptr = tl.load(ttab + ROW_STEP * T + offs, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(sptr, mask=mask, other=0.0) + 1.0
    tl.store(sptr, step, mask=mask)
    e = step.to(tl.int32)
    b1 = (tl.zeros([], tl.float64) + b1_hi) + b1_lo
    b2 = (tl.zeros([], tl.float64) + b2_hi) + b2_lo
    lr = (tl.zeros([], tl.float64) + lr_hi) + lr_lo
    base1 = tl.zeros([BLOCK], tl.float64) + b1
    base2 = tl.zeros([BLOCK], tl.float64) + b2
    pw1 = tl.zeros([BLOCK], tl.float64) + 1.0
    pw2 = tl.zeros([BLOCK], tl.float64) + 1.0
    for _ in tl.static_range(31):  # beta ** t by binary exponentiation, exact to fp64 rounding
        odd = (e & 1) != 0
        pw1 = tl.where(odd, pw1 * base1, pw1)
        pw2 = tl.where(odd, pw2 * base2, pw2)
        base1 = base1 * base1
        base2 = base2 * base2
        e = e >> 1
    step_size = lr / (1.0 - pw1)
    bc2_sqrt = tl.sqrt(1.0 - pw2)
    tl.store(ws + WS_STEP_SIZE * T + offs, step_size.to(tl.float32), mask=mask)
    tl.store(ws + WS_BC2_SQRT * T + offs, bc2_sqrt.to(tl.float32), mask=mask)
    tl.store(ws + WS_T * T + offs, step, mask=mask)
