"""Ahead-of-time compilation of every fused kernel variant for an NVIDIA target, no GPU needed.

The Triton interpreter (how CI runs the kernels) accepts code that the GPU compiler rejects,
and vice versa; this compiles each kernel specialisation to a cubin for sm_90 (H100; sm_80
on request) with Triton's bundled ptxas, so GPU lowering errors show up on a CPU-only
machine. It runs in a subprocess because TRITON_INTERPRET decides at import time whether
``@triton.jit`` builds interpreted or compiled kernels. Every variant: about three minutes on 2
cores (``slow``); the vector-access check of the masked full tiles: about 15 s.

Manual use: ``python tests/kernels/test_kernels_compile.py [capability ...]`` prints register and
spill counts per variant (from ``ptxas -v``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton") if __name__ != "__main__" else None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _variants(full=True):
    import triton.language as tl

    from maskopt.kernels import _apply, _common, _dense, _fallback, _local, _resolve, _sharded, _window

    P64, I64 = "*i64", "i64"
    out = []
    dtypes = (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16))
    window = dict(FRAC=5, NB_LOG2=9)
    for pdt_name, pdt in dtypes if full else dtypes[:2]:
        sec = 8 if pdt_name == "fp32" else 16
        mdt = tl.bfloat16 if pdt_name == "bf16" else tl.float32  # bf16 parameters: bf16 moments
        base = dict(
            ttab=P64, T="i32", ctab=P64, C="i32", ws="*fp32", found_inf_ptr="*fp32", grad_scale_ptr="*fp32"
        )
        for mode in (0, 1):
            for decay in (0, 1, 2):
                sig = dict(
                    base,
                    beta1="fp32",
                    omb1="fp32",
                    beta2="fp32",
                    omb2="fp32",
                    eps="fp32",
                    decay="fp32",
                    hash_counter="i32",
                    threshold=I64,
                )
                cx = dict(
                    PDT=pdt,
                    MDT=mdt,
                    MODE=mode,
                    HAS_INF=True,
                    HAS_SCALE=True,
                    DECAY=decay,
                    USE_HCOUNTER=mode == 1,
                    HUGE=False,
                    ALIGNED=True,
                    SEC=sec,
                    CHUNK=4096,
                )
                out.append((f"dense/{pdt_name}/mode{mode}/decay{decay}", _dense.dense_step_kernel, sig, cx))
        for key_mode in (0, 1, 2):
            idxb = 31 if key_mode == 2 else 32
            sig = dict(
                base,
                per_program="i32",
                sst=P64,
                S="i32",
                hist="*i32",
                zcount=P64,
                beta1="fp32",
                omb1="fp32",
                beta2="fp32",
                omb2="fp32",
                hash_counter="i32",
            )
            cx = dict(
                PDT=pdt,
                MDT=mdt,
                KEY_MODE=key_mode,
                HAS_INF=True,
                HAS_SCALE=True,
                USE_HCOUNTER=False,
                HUGE=key_mode == 2,
                ALIGNED=True,
                CHUNK=4096,
                **window,
            )
            out.append((f"moments/{pdt_name}/key{key_mode}", _window.moments_window_kernel, sig, cx))
            sig = dict(
                ttab=P64,
                T="i32",
                ws="*fp32",
                sst=P64,
                S="i32",
                stab=P64,
                found_inf_ptr="*fp32",
                grad_scale_ptr="*fp32",
                hash_counter="i32",
            )
            cx = dict(
                PDT=pdt,
                MDT=mdt,
                KEY_MODE=key_mode,
                HAS_INF=True,
                HAS_SCALE=True,
                USE_HCOUNTER=False,
                HUGE=False,
                IDXB=idxb,
                CHUNK=4096,
            )
            out.append((f"fallback/{pdt_name}/key{key_mode}", _fallback.exact_select_kernel, sig, cx))
            for decay in (1, 2):
                sig = dict(
                    base,
                    per_program="i32",
                    sst=P64,
                    S="i32",
                    stab=P64,
                    cand=P64,
                    zcount=P64,
                    eps="fp32",
                    decay="fp32",
                    hash_counter="i32",
                )
                cx = dict(
                    PDT=pdt,
                    MDT=mdt,
                    KEY_MODE=key_mode,
                    HAS_INF=True,
                    HAS_SCALE=True,
                    DECAY=decay,
                    USE_HCOUNTER=False,
                    HUGE=False,
                    ALIGNED=True,
                    IDXB=idxb,
                    SEC=sec,
                    CHUNK=4096,
                    **window,
                )
                out.append(
                    (f"apply/{pdt_name}/key{key_mode}/decay{decay}", _apply.apply_compact_kernel, sig, cx)
                )
            for rows, bb in ((1, 4096), (8, 256), (8, 16)):
                sig = dict(
                    ttab=P64,
                    T="i32",
                    ltab=P64,
                    SL="i32",
                    ws="*fp32",
                    found_inf_ptr="*fp32",
                    grad_scale_ptr="*fp32",
                    beta1="fp32",
                    omb1="fp32",
                    beta2="fp32",
                    omb2="fp32",
                    eps="fp32",
                    decay="fp32",
                    hash_counter="i32",
                )
                cx = dict(
                    PDT=pdt,
                    MDT=mdt,
                    KEY_MODE=key_mode,
                    HAS_INF=True,
                    HAS_SCALE=True,
                    DECAY=1,
                    USE_HCOUNTER=True,
                    HUGE=False,
                    KEYBITS=32 if key_mode == 2 else 31,
                    ROWS=rows,
                    BB=bb,
                )
                out.append((f"local/{pdt_name}/key{key_mode}/bb{bb}", _local.local_step_kernel, sig, cx))
        for decay in (1, 2):
            sig = dict(
                ttab=P64,
                T="i32",
                ws="*fp32",
                sst=P64,
                S="i32",
                stab=P64,
                cand=P64,
                found_inf_ptr="*fp32",
                eps="fp32",
                decay="fp32",
            )
            cx = dict(
                PDT=pdt,
                MDT=mdt,
                HAS_INF=True,
                DECAY=decay,
                FLOAT_KEY=True,
                IDXB=32,
                TOP_SHIFT=48,
                TILE=1024,
                THR_KNOWN=False,
                **window,
            )
            out.append((f"resolve/{pdt_name}/decay{decay}", _resolve.resolve_kernel, sig, cx))
    for float_key in (True, False):
        sig = dict(
            hist="*i32",
            sst=P64,
            S="i32",
            stab=P64,
            zcount=P64,
            ztotal=P64,
            rank="i32",
            world="i32",
            found_inf_ptr="*fp32",
        )
        cx = dict(
            HAS_INF=True, FLOAT_KEY=float_key, IDXB=32 if float_key else 31, TOP_SHIFT=48, SCAN=1024, **window
        )
        out.append((f"select/float{float_key}", _window.window_select_kernel, sig, cx))
    for key_mode in (0, 2):
        sig = dict(
            ttab=P64,
            T="i32",
            ctab=P64,
            C="i32",
            per_program="i32",
            ws="*fp32",
            sst=P64,
            S="i32",
            hist="*i32",
            found_inf_ptr="*fp32",
            grad_scale_ptr="*fp32",
            hash_counter="i32",
            shift="i32",
        )
        cx = dict(
            PDT=tl.float32,
            MDT=tl.float32,
            KEY_MODE=key_mode,
            HAS_INF=True,
            HAS_SCALE=True,
            USE_HCOUNTER=False,
            HUGE=False,
            IDXB=31 if key_mode == 2 else 32,
            CHUNK=4096,
        )
        out.append((f"sharded/data_level/key{key_mode}", _sharded.data_level_kernel, sig, cx))
    sig = dict(sst=P64, S="i32", stab=P64, cand=P64, hist="*i32", found_inf_ptr="*fp32", shift="i32")
    out.append(("sharded/cand_level", _sharded.cand_level_kernel, sig, dict(HAS_INF=True, TILE=1024)))
    sig = dict(hist="*i32", sst=P64, S="i32", found_inf_ptr="*fp32", shift="i32")
    out.append(("sharded/level_select", _sharded.level_select_kernel, sig, dict(MODE=3, HAS_INF=True)))
    sig = dict(
        ttab=P64,
        T="i32",
        ws="*fp32",
        found_inf_ptr="*fp32",
        b1_hi="fp32",
        b1_lo="fp32",
        b2_hi="fp32",
        b2_lo="fp32",
        lr_hi="fp32",
        lr_lo="fp32",
    )
    out.append(("prologue", _common.prologue_kernel, sig, dict(HAS_INF=True, BLOCK=1024)))
    return out


def compile_all(capabilities=(90,), only=None, verbose=False, full=True):
    """Compile every variant (``full=False``: fp32 and bf16 only); returns {name: error or None}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, fn, sig, cx in _variants(full):
        if only and only not in name:
            continue
        full_sig = dict(sig)
        for k in cx:
            full_sig[k] = "constexpr"
        for cap in capabilities:
            try:
                src = ASTSource(fn=fn, signature=full_sig, constexprs=cx)
                small = ("select", "prologue", "resolve", "sharded/cand", "sharded/level")
                num_warps = 4 if name.startswith(small) else 16 if name.startswith("local") else 8
                num_warps = int(os.environ.get("NW", num_warps))
                k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": num_warps})
                info = ""
                if verbose:
                    info = _ptxas_info(k.asm["ptx"], cap)
                results[f"{name}@sm{cap}"] = None
                if verbose:
                    print(f"{name}@sm{cap}: ok {info}", flush=True)
            except Exception as e:
                results[f"{name}@sm{cap}"] = f"{type(e).__name__}: {e}"[:2000]
                if verbose:
                    print(f"{name}@sm{cap}: FAILED {results[f'{name}@sm{cap}'][:500]}", flush=True)
    return results


def _ptxas_info(ptx: str, cap: int) -> str:
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(cap).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = f"sm_{cap}a" if cap == 90 else f"sm_{cap}"
        r = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")],
            capture_output=True,
            text=True,
        )
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
    return f"regs={regs[-1] if regs else '?'} spill_stores={spills[-1] if spills else '?'}"


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
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90():
    failures = _compiled("{k: v for k, v in compile_all((90,), full=False).items() if v}")
    assert not failures, failures


def full_tile_accesses(capability=90):
    """Global access counts and ptxas spill stores of the full-tile bodies of pass 2 and of
    RandomBCD's pass, per variant: {name: (Counter of ld/st.global forms, spill stores)}."""
    import collections
    import re

    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _full_tiles

    out = {}
    tables = dict(tab="*i64", ttab="*i64", T="i32", ws="*fp32")
    for pdt_name, pdt, sec, mdt in (
        ("fp32", tl.float32, 8, tl.float32),
        ("bf16", tl.bfloat16, 16, tl.float32),
        ("bf16-bf16moments", tl.bfloat16, 16, tl.bfloat16),
    ):
        cases = []
        for key_mode in (0, 1, 2):
            for decay in (1, 2):
                sig = dict(
                    tables,
                    sst="*i64",
                    S="i32",
                    stab="*i64",
                    cand="*i64",
                    zcount="*i64",
                    grad_scale_ptr="*fp32",
                    eps="fp32",
                    decay="fp32",
                )
                cx = dict(PDT=pdt, MDT=mdt, KEY_MODE=key_mode, DECAY=decay, SEC=sec, CHUNK=4096)
                cases.append(
                    (f"apply/{pdt_name}/key{key_mode}/decay{decay}", _full_tiles.apply_full_tile, sig, cx)
                )
        for decay in (1, 2):
            sig = dict(tables, grad_scale_ptr="*fp32", eps="fp32", decay="fp32", threshold="i64")
            cx = dict(PDT=pdt, MDT=mdt, DECAY=decay, SEC=sec, CHUNK=4096)
            cases.append((f"random/{pdt_name}/decay{decay}", _full_tiles.dense_full_tile, sig, cx))
        for name, fn, sig, cx in cases:
            full_sig = dict(sig, **{k: "constexpr" for k in cx})
            k = triton.compile(
                ASTSource(fn=fn, signature=full_sig, constexprs=cx),
                target=GPUTarget("cuda", capability, 32),
                options={"num_warps": 8},
            )
            forms = collections.Counter(
                m.group(0) for m in re.finditer(r"\b(ld|st)\.global[\w.]*", k.asm["ptx"])
            )
            spills = re.search(r"spill_stores=(\d+)", _ptxas_info(k.asm["ptx"], capability))
            out[name] = (forms, int(spills.group(1)) if spills else None)
    return out


def test_masked_full_tiles_use_vector_accesses_without_spills():
    """p, v (and m) move in 128-bit accesses under the sector masks of pass 2 and RandomBCD:
    the only scalar 32-bit accesses left are the per-tensor scalars (step size, bias
    correction, grad scale); 64-bit ones are table reads and candidate stores."""
    accesses = _compiled("{k: [dict(v[0]), v[1]] for k, v in full_tile_accesses().items()}")
    for name, (forms, spills) in accesses.items():
        scalar = {f: c for f, c in forms.items() if f.endswith((".b32", ".b16")) and ".v" not in f}
        assert not any(f.startswith("st.") for f in scalar), (name, forms)
        assert sum(scalar.values()) <= 3, (name, forms)
        assert forms.get("ld.global.v4.b32", 0) >= 4, (name, forms)
        assert spills == 0, (name, spills)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    caps = tuple(int(a) for a in sys.argv[1:] if a.isdigit()) or (90,)
    only = next((a for a in sys.argv[1:] if not a.isdigit()), None)
    res = compile_all(caps, only=only, verbose=True)
    bad = {k: v for k, v in res.items() if v}
    print(f"{len(res) - len(bad)}/{len(res)} variants compiled")
    sys.exit(1 if bad else 0)
