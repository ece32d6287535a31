"""Ahead-of-time compilation of the fused kernels for NVIDIA targets, no GPU needed.

The Triton interpreter (how CI runs the kernels) accepts code that the GPU compiler rejects,
and computes with NumPy where the GPU runs PTX. This compiles kernel specialisations to cubins
with Triton's bundled ptxas and the launcher's own options (``launch.LAUNCH_OPTIONS``), then
checks, per variant:

* it compiles;
* its PTX holds no float instruction whose bits the interpreter cannot reproduce: no
  approximate division, reciprocal or square root, no fused multiply-add (contraction), no
  flush of subnormals to zero (:data:`NOT_IEEE`);
* ptxas's registers are within :data:`REGISTER_BUDGET` and nothing spills.

The default run checks a representative subset (the production fp32 variants of every
launch, sm_90) and the vector accesses of the masked full tiles, in one subprocess (about 15 s
on 2 cores). The ``slow`` test compiles every variant of :func:`variants` for sm_80 and sm_90
(the production flags ``HAS_INF``/``HAS_SCALE`` false with every ``DECAY``, aligned and
unaligned, and GradScaler's, over the parameter and moment dtypes).

Manual use: ``python tests/kernels/test_kernels_compile.py [capability ...] [name filter]``
prints registers, spills and the float instructions of each variant.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton") if __name__ != "__main__" else None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Float instructions whose results the interpreter (NumPy, IEEE round-to-nearest, no
# contraction, subnormals kept) does not reproduce. fp64 ``div.rn``/``sqrt.rn`` of the prologue
# and fp32 ``div.rn``/``sqrt.rn`` are IEEE and allowed.
NOT_IEEE = re.compile(
    r"\b(?:div\.full\.\w+|div\.approx\.\w+|rcp\.approx\.[\w.]+|rsqrt\.approx\.[\w.]+"
    r"|sqrt\.approx\.[\w.]+|ex2\.approx\.[\w.]+|lg2\.approx\.[\w.]+|fma\.\w+\.f(?:32|64)"
    r"|mad\.\w*\.?f(?:32|64)|\w+\.ftz\.f32)\b"
)
FLOAT_OPS = re.compile(r"\b(?:div|rcp|sqrt|rsqrt|fma|mad)\.[\w.]*f(?:32|64)\b")

# Registers per thread (ptxas -v, sm_80 and sm_90) that a variant may use, by kernel. The
# streaming kernels (dense, moments, apply, fallback, data_level) and the local kernel run
# 16 warps per program, where ptxas has at most 128 registers per thread (65536 per SM): pass 2
# fits without spilling, so an SM holds 16 of its warps, as two 8-warp programs at 128 would.
# (At 8 warps, 16 entries per thread, pass 2 took 250 registers, one 8-warp program per SM.)
# The other budgets are the measured maxima, rounded up to a multiple of 8, so that a change
# that costs registers shows here.
REGISTER_BUDGET = {
    "prologue": 104,
    "dense": 128,
    "moments": 128,
    "select": 72,
    "fallback": 128,
    "apply": 128,
    "resolve": 128,
    "local": 128,
    "data_level": 128,
    "cand_level": 96,
    "cand_update": 120,
    "level_select": 32,
}
# Spill stores a variant may have (bytes), else none: the single-pass kernel with hash keys
# and weight decay on every entry (RandomBCD(exact=True, mask_weight_decay=False), segments
# of 2049-4096 entries) saves a few registers around the calls of the IEEE division's slow
# path at the 128-register limit; so does the spread candidates' update of bf16 parameters
# on sm_80 (32 bytes of stack in a kernel that gathers scattered entries).
SPILL_ALLOWANCE = {
    re.compile(r"local/[^/]+/key2/bb4096/decay2/"): 24,
    re.compile(r"cand_update/bf16/decay1/[^@]+@sm80"): 32,
}

# The variants of the default run: what a fp32 MoFO, RandomBCD or AdamW step launches without
# GradScaler, with weight decay (every DECAY for pass 2), on aligned tensors.
DEFAULT_VARIANTS = (
    "prologue/prod",
    "dense/fp32/mode0/decay1/prod/aligned",
    "dense/fp32/mode1/decay1/prod/aligned",
    "moments/fp32/key0/prod/aligned",
    "select/float/prod",
    "fallback/fp32/key0/prod",
    "apply/fp32/key0/decay0/prod/aligned",
    "apply/fp32/key0/decay1/prod/aligned",
    "apply/fp32/key0/decay2/prod/aligned",
    "resolve/fp32/decay1/prod",
    "cand_level/prod",
    "cand_update/fp32/decay1/prod",
    "local/fp32/key0/bb4096/decay1/prod",
)

# Kernel arguments that are not constexpr, by name, as the launcher passes them.
ARG_TYPES = dict(
    tab="*i64",  # the full-tile kernels' address table (_full_tiles.py)
    ttab="*i64",
    T="i32",
    ctab="*i64",
    C="i32",
    btab="*i64",
    B="i32",
    per_program="i32",
    ltab="*i64",
    SL="i32",
    ws="*fp32",
    sst="*i64",
    S="i32",
    stab="*i64",
    cand="*i64",
    zcount="*i64",
    ztotal="*i64",
    hist="*i64",
    hist_max="*i64",
    found_inf_ptr="*fp32",
    grad_scale_ptr="*fp32",
    beta1="fp32",
    omb1="fp32",
    beta2="fp32",
    omb2="fp32",
    eps="fp32",
    decay="fp32",
    hash_counter="i32",
    threshold="i64",
    shift="i32",
    rank="i32",
    world="i32",
    b1_hi="fp32",
    b1_lo="fp32",
    b2_hi="fp32",
    b2_lo="fp32",
    lr_hi="fp32",
    lr_lo="fp32",
)


def variants(names=None):
    """``(name, kernel, constexprs, num_warps)`` of the kernel specialisations the launcher
    builds, with its default config: every one (``names=None``) or those named."""
    import triton.language as tl

    from maskopt.kernels import _apply, _common, _dense, _fallback, _levels, _local, _resolve, _window
    from maskopt.kernels.launch import KernelConfig
    from maskopt.kernels.plan import _MAX_ROWS

    cfg = KernelConfig()
    window = dict(FRAC=cfg.window_frac, NB_LOG2=cfg.window_bins_log2)
    # parameter and moment dtypes: the production grid runs over the first two
    dtypes = {
        "fp32": (tl.float32, tl.float32),
        "bf16": (tl.bfloat16, tl.float32),
        "bf16-bf16m": (tl.bfloat16, tl.bfloat16),
        "fp16": (tl.float16, tl.float32),
        "fp32-bf16m": (tl.float32, tl.bfloat16),
    }
    flag_sets = {"prod": dict(HAS_INF=False, HAS_SCALE=False), "scaler": dict(HAS_INF=True, HAS_SCALE=True)}
    out = []

    def add(name, kernel, num_warps, **constexprs):
        if names is None or name in names:
            params = set(kernel.arg_names)
            out.append((name, kernel, {k: v for k, v in constexprs.items() if k in params}, num_warps))

    def key_bits(key_mode):  # (index bits of the composite key, key bits of the local kernel)
        return (31, 32) if key_mode == 2 else (32, 31)

    for flags in flag_sets:
        add(f"prologue/{flags}", _common.prologue_kernel, 4, BLOCK=1024, **flag_sets[flags])
        for float_key in (True, False):
            idxb = 32 if float_key else 31
            add(
                f"select/{'float' if float_key else 'hash'}/{flags}",
                _window.window_select_kernel,
                cfg.select_num_warps,
                FLOAT_KEY=float_key,
                IDXB=idxb,
                TOP_SHIFT=48,
                SCAN=1024,
                SHARDED=False,
                **window,
                **flag_sets[flags],
            )
        add(
            f"select/sharded/{flags}",
            _window.window_select_kernel,
            cfg.select_num_warps,
            FLOAT_KEY=True,
            IDXB=32,
            TOP_SHIFT=48,
            SCAN=1024,
            SHARDED=True,
            **window,
            **flag_sets[flags],
        )
        for mode in (0, 3):
            add(
                f"level_select/mode{mode}/{flags}",
                _levels.level_select_kernel,
                cfg.select_num_warps,
                MODE=mode,
                **flag_sets[flags],
            )
        add(
            f"cand_level/{flags}",
            _levels.cand_level_kernel,
            cfg.select_num_warps,
            TILE=cfg.resolve_tile,
            BLOCK=cfg.cand_block,
            **flag_sets[flags],
        )

    for dt, (pdt, mdt) in dtypes.items():
        production = dt in ("fp32", "bf16")
        sec = 32 // (pdt.primitive_bitwidth // 8)  # entries per 32-byte sector of p
        types = dict(PDT=pdt, MDT=mdt)
        for flags in flag_sets if production else ("prod",):
            wide = production and flags == "prod"  # every DECAY, aligned and unaligned
            decays = (0, 1, 2) if wide else (1,)
            alignments = (True, False) if wide else (True,)
            fl = dict(flag_sets[flags], USE_HCOUNTER=False, HUGE=False)
            for aligned in alignments:
                at = "aligned" if aligned else "unaligned"
                for mode in (0, 1):
                    for decay in decays:
                        add(
                            f"dense/{dt}/mode{mode}/decay{decay}/{flags}/{at}",
                            _dense.dense_step_kernel,
                            cfg.num_warps,
                            MODE=mode,
                            DECAY=decay,
                            ALIGNED=aligned,
                            SEC=sec,
                            CHUNK=cfg.chunk,
                            **types,
                            **fl,
                        )
                for key_mode in (0, 1, 2):
                    idxb, _ = key_bits(key_mode)
                    add(
                        f"moments/{dt}/key{key_mode}/{flags}/{at}",
                        _window.moments_window_kernel,
                        cfg.num_warps,
                        KEY_MODE=key_mode,
                        ALIGNED=aligned,
                        CHUNK=cfg.chunk,
                        **window,
                        **types,
                        **fl,
                    )
                    for decay in decays:
                        add(
                            f"apply/{dt}/key{key_mode}/decay{decay}/{flags}/{at}",
                            _apply.apply_compact_kernel,
                            cfg.num_warps,
                            KEY_MODE=key_mode,
                            DECAY=decay,
                            ALIGNED=aligned,
                            IDXB=idxb,
                            SEC=sec,
                            CHUNK=cfg.chunk,
                            **window,
                            **types,
                            **fl,
                        )
            for key_mode in (0, 1, 2):
                idxb, keybits = key_bits(key_mode)
                add(
                    f"fallback/{dt}/key{key_mode}/{flags}",
                    _fallback.exact_select_kernel,
                    cfg.num_warps,
                    KEY_MODE=key_mode,
                    IDXB=idxb,
                    CHUNK=cfg.chunk,
                    **types,
                    **fl,
                )
                if production:
                    add(
                        f"data_level/{dt}/key{key_mode}/{flags}",
                        _levels.data_level_kernel,
                        cfg.num_warps,
                        KEY_MODE=key_mode,
                        IDXB=idxb,
                        CHUNK=cfg.chunk,
                        **types,
                        **fl,
                    )
                # the widest row (one segment per program) and the widest short row
                for bb in (cfg.local_tile, 256) if wide else (cfg.local_tile,):
                    for decay in decays:
                        add(
                            f"local/{dt}/key{key_mode}/bb{bb}/decay{decay}/{flags}",
                            _local.local_step_kernel,
                            cfg.local_num_warps,
                            KEY_MODE=key_mode,
                            DECAY=decay,
                            KEYBITS=keybits,
                            ROWS=max(1, min(_MAX_ROWS, cfg.local_tile // bb)),
                            BB=bb,
                            **types,
                            **fl,
                        )
            for decay in decays:
                add(
                    f"cand_update/{dt}/decay{decay}/{flags}",
                    _levels.cand_update_kernel,
                    cfg.select_num_warps,
                    DECAY=decay,
                    IDXB=32,
                    TILE=cfg.resolve_tile,
                    BLOCK=cfg.cand_block,
                    **types,
                    **fl,
                )
                for float_key in (True, False) if wide else (True,):
                    add(
                        f"resolve/{dt}/decay{decay}/{flags}" + ("" if float_key else "/hash"),
                        _resolve.resolve_kernel,
                        cfg.select_num_warps,
                        DECAY=decay,
                        FLOAT_KEY=float_key,
                        IDXB=32 if float_key else 31,
                        TOP_SHIFT=48 if float_key else 40,
                        TILE=cfg.resolve_tile,
                        LEVELS=False,
                        **window,
                        **types,
                        **fl,
                    )
    # the options that only some calls take: HalfAdam's round counter, tensors over 2**32
    # entries, a sharded resolve, the other row widths of the local kernel
    fp32 = dict(PDT=tl.float32, MDT=tl.float32, HAS_INF=False, HAS_SCALE=False)
    for use_hcounter, huge in ((True, False), (False, True)):
        extra = "hcounter" if use_hcounter else "huge"
        add(
            f"dense/fp32/mode1/decay1/{extra}",
            _dense.dense_step_kernel,
            cfg.num_warps,
            MODE=1,
            DECAY=1,
            ALIGNED=True,
            SEC=8,
            CHUNK=cfg.chunk,
            USE_HCOUNTER=use_hcounter,
            HUGE=huge,
            **fp32,
        )
        add(
            f"moments/fp32/key2/{extra}",
            _window.moments_window_kernel,
            cfg.num_warps,
            KEY_MODE=2,
            ALIGNED=True,
            CHUNK=cfg.chunk,
            USE_HCOUNTER=use_hcounter,
            HUGE=huge,
            **window,
            **fp32,
        )
        add(
            f"apply/fp32/key2/decay1/{extra}",
            _apply.apply_compact_kernel,
            cfg.num_warps,
            KEY_MODE=2,
            DECAY=1,
            ALIGNED=True,
            IDXB=31,
            SEC=8,
            CHUNK=cfg.chunk,
            USE_HCOUNTER=use_hcounter,
            HUGE=huge,
            **window,
            **fp32,
        )
    add(
        "resolve/fp32/decay1/levels",
        _resolve.resolve_kernel,
        cfg.select_num_warps,
        DECAY=1,
        FLOAT_KEY=True,
        IDXB=32,
        TOP_SHIFT=48,
        TILE=cfg.resolve_tile,
        LEVELS=True,
        **window,
        **fp32,
    )
    for bb in (16, 512, 1024, 2048):
        add(
            f"local/fp32/key0/bb{bb}/decay1",
            _local.local_step_kernel,
            cfg.local_num_warps,
            KEY_MODE=0,
            DECAY=1,
            KEYBITS=31,
            ROWS=max(1, min(_MAX_ROWS, cfg.local_tile // bb)),
            BB=bb,
            USE_HCOUNTER=False,
            HUGE=False,
            **fp32,
        )
    return out


def _compile(kernel, constexprs, num_warps, capability):
    """``(compiled kernel, ptxas -v log)`` with the launcher's options."""
    import contextlib
    import io

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from maskopt.kernels.launch import LAUNCH_OPTIONS

    signature = {a: "constexpr" if a in constexprs else ARG_TYPES[a] for a in kernel.arg_names}
    log = io.StringIO()
    # compile even on a cache hit, so that ptxas runs and prints its resource use
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", capability, 32),
            options=dict(LAUNCH_OPTIONS, num_warps=num_warps),
        )
    return compiled, log.getvalue()


def check_variant(name, kernel, constexprs, num_warps, capability):
    """The compile result of one variant: registers, spill stores, the float instructions of
    its PTX and those :data:`NOT_IEEE` forbids (``error`` when it does not compile)."""
    import collections

    try:
        compiled, log = _compile(kernel, constexprs, num_warps, capability)
    except Exception as e:
        return dict(error=f"{type(e).__name__}: {e}"[:2000])
    ptx = compiled.asm["ptx"]
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return dict(
        registers=int(regs[-1]) if regs else None,
        spill_stores=int(spills[-1]) if spills else None,
        float_ops=dict(collections.Counter(FLOAT_OPS.findall(ptx))),
        not_ieee=sorted(set(NOT_IEEE.findall(ptx))),
    )


def check_all(capabilities=(90,), names=None, only=None):
    """{``name@smXX``: :func:`check_variant`'s result} over :func:`variants`."""
    results = {}
    for name, kernel, constexprs, num_warps in variants(names):
        if only and only not in name:
            continue
        for cap in capabilities:
            results[f"{name}@sm{cap}"] = check_variant(name, kernel, constexprs, num_warps, cap)
    return results


def _problems(results):
    """What is wrong with each variant: a compile error, an instruction the interpreter does
    not reproduce, registers over the budget, spills."""
    out = {}
    for key, res in results.items():
        family = key.split("/")[0]
        if "error" in res:
            out[key] = res["error"]
            continue
        found = []
        if res["not_ieee"]:
            found.append(f"not IEEE: {res['not_ieee']}")
        if res["registers"] is None or res["registers"] > REGISTER_BUDGET[family]:
            found.append(f"{res['registers']} registers > {REGISTER_BUDGET[family]}")
        allowed = max((n for pattern, n in SPILL_ALLOWANCE.items() if pattern.match(key)), default=0)
        if res["spill_stores"] is None or res["spill_stores"] > allowed:
            found.append(f"{res['spill_stores']} bytes of spill stores")
        if found:
            out[key] = "; ".join(found)
    return out


def _table(results):
    return "\n".join(
        f"{key:60s} {res.get('registers', '-')!s:>4} regs  spills {res.get('spill_stores', '-')}  "
        f"{res.get('float_ops', res.get('error', ''))}"
        for key, res in sorted(results.items())
    )


def _compiled(expression: str):
    """``expression`` (over this module's names) evaluated in a process without
    TRITON_INTERPRET, where ``@triton.jit`` builds compiled kernels; its JSON value."""
    import json

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code = (
        "import sys, json; sys.path.insert(0, 'tests/kernels'); from test_kernels_compile import *;"
        f"print(json.dumps({expression}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def full_tile_accesses(capability=90):
    """Global access counts and ptxas spill stores of the full-tile bodies of pass 2 and of
    RandomBCD's pass, per variant: {name: (Counter of ld/st.global forms, spill stores)}."""
    import collections

    import triton.language as tl

    from maskopt.kernels.launch import KernelConfig

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _full_tiles

    num_warps = KernelConfig().num_warps
    out = {}
    for pdt_name, pdt, sec, mdt in (
        ("fp32", tl.float32, 8, tl.float32),
        ("bf16", tl.bfloat16, 16, tl.float32),
        ("bf16-bf16moments", tl.bfloat16, 16, tl.bfloat16),
    ):
        cases = []
        for key_mode in (0, 1, 2):
            for decay in (1, 2):
                cx = dict(PDT=pdt, MDT=mdt, KEY_MODE=key_mode, DECAY=decay, SEC=sec, CHUNK=4096)
                cases.append(
                    (f"apply/{pdt_name}/key{key_mode}/decay{decay}", _full_tiles.apply_full_tile, cx)
                )
        for decay in (1, 2):
            cx = dict(PDT=pdt, MDT=mdt, DECAY=decay, SEC=sec, CHUNK=4096)
            cases.append((f"random/{pdt_name}/decay{decay}", _full_tiles.dense_full_tile, cx))
        for name, fn, cx in cases:
            k, log = _compile(fn, cx, num_warps, capability)
            forms = collections.Counter(
                m.group(0) for m in re.finditer(r"\b(ld|st)\.global[\w.]*", k.asm["ptx"])
            )
            spills = re.findall(r"(\d+) bytes spill stores", log)
            out[name] = (forms, int(spills[-1]) if spills else None)
    return out


@pytest.fixture(scope="module")
def default_checks():
    """The default run's compilations, in one subprocess (an import of Triton and torch costs
    seconds)."""
    return _compiled(
        "dict(variants=check_all((90,), names=DEFAULT_VARIANTS), "
        "tiles={k: [dict(v[0]), v[1]] for k, v in full_tile_accesses().items()})"
    )


def test_production_variants_compute_ieee_within_the_register_budget(default_checks):
    results = default_checks["variants"]
    print("\n" + _table(results))
    assert len(results) == len(DEFAULT_VARIANTS), sorted(results)
    problems = _problems(results)
    assert not problems, f"{problems}\n{_table(results)}"


def test_masked_full_tiles_use_vector_accesses_without_spills(default_checks):
    """p, v (and m) move in 128-bit accesses under the sector masks of pass 2 and RandomBCD:
    the only scalar 32-bit accesses left are the per-tensor scalars (step size, bias
    correction, grad scale); 64-bit ones are table reads and candidate stores."""
    for name, (forms, spills) in default_checks["tiles"].items():
        scalar = {f: c for f, c in forms.items() if f.endswith((".b32", ".b16")) and ".v" not in f}
        assert not any(f.startswith("st.") for f in scalar), (name, forms)
        assert sum(scalar.values()) <= 3, (name, forms)
        assert forms.get("ld.global.v4.b32", 0) >= 3, (name, forms)  # 16-bit arrays: one per thread
        assert forms.get("st.global.v4.b32", 0) >= 1, (name, forms)
        assert spills == 0, (name, spills)


@pytest.mark.slow
def test_every_kernel_variant_compiles_ieee_for_sm80_and_sm90():
    results = _compiled("check_all((80, 90))")
    print("\n" + _table(results))
    problems = _problems(results)
    assert not problems, f"{len(problems)} of {len(results)} variants: {problems}"


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    caps = tuple(int(a) for a in sys.argv[1:] if a.isdigit()) or (90,)
    only = next((a for a in sys.argv[1:] if not a.isdigit()), None)
    res = check_all(caps, only=only)
    print(_table(res))
    bad = _problems(res)
    for key, what in sorted(bad.items()):
        print(f"PROBLEM {key}: {what}")
    print(f"{len(res) - len(bad)}/{len(res)} variants within the checks")
    sys.exit(1 if bad else 0)
