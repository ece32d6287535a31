"""Ahead-of-time compilation of every fused kernel variant for an NVIDIA target, no GPU needed.

The Triton interpreter (how CI runs the kernels) accepts code that the GPU compiler rejects,
and vice versa; this compiles each kernel specialisation to a cubin for sm_90 (H100; sm_80
on request) with Triton's bundled ptxas, so GPU lowering errors show up on a CPU-only
machine. It runs in a subprocess because TRITON_INTERPRET decides at import time whether
``@triton.jit`` builds interpreted or compiled kernels. About three minutes on 2 cores: ``slow``.

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

    from maskopt.kernels import _apply, _common, _dense, _local, _moments, _select

    P64, I = "*i64", "i64"
    out = []
    dtypes = (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16))
    for pdt_name, pdt in dtypes if full else dtypes[:2]:
        base = dict(ttab=P64, T="i32", ctab=P64, C="i32", ws="*fp32", found_inf_ptr="*fp32",
                    grad_scale_ptr="*fp32")
        for mode in (0, 1):
            for decay in (0, 1, 2):
                sig = dict(base, beta1="fp32", omb1="fp32", beta2="fp32", omb2="fp32", eps="fp32",
                           decay="fp32", hash_counter="i32", threshold=I)
                cx = dict(PDT=pdt, MODE=mode, HAS_INF=True, HAS_SCALE=True, DECAY=decay,
                          USE_HCOUNTER=mode == 1, HUGE=False, ALIGNED=True, CHUNK=4096)
                out.append((f"dense/{pdt_name}/mode{mode}/decay{decay}", _dense.dense_step_kernel, sig, cx))
        for key_mode in (0, 1, 2):
            sig = dict(base, hist="*i32", beta1="fp32", omb1="fp32", beta2="fp32", omb2="fp32",
                       hash_counter="i32")
            cx = dict(PDT=pdt, KEY_MODE=key_mode, HAS_INF=True, HAS_SCALE=True, USE_HCOUNTER=False,
                      HUGE=key_mode == 2, ALIGNED=True, KEY_SHIFT=20, BITS=11, CHUNK=4096)
            out.append((f"moments/{pdt_name}/key{key_mode}", _moments.moments_hist_kernel, sig, cx))
            for phase, shift, bits in ((1, 41, 11), (2, 8, 8), (0, 19, 11)):
                sig = dict(base, hist="*i32", sst=P64, S="i32", stab=P64, cand=P64, hash_counter="i32")
                cx = dict(PDT=pdt, KEY_MODE=key_mode, HAS_INF=True, HAS_SCALE=True, USE_HCOUNTER=False,
                          HUGE=False, ALIGNED=True, PHASE=phase, IDXB=31 if key_mode == 2 else 32,
                          SHIFT=shift, BITS=bits, CHUNK=4096)
                out.append((f"refine/{pdt_name}/key{key_mode}/phase{phase}", _select.refine_kernel, sig, cx))
            for decay in (1, 2):
                sig = dict(base, sst=P64, S="i32", eps="fp32", decay="fp32", hash_counter="i32")
                cx = dict(PDT=pdt, KEY_MODE=key_mode, HAS_INF=True, HAS_SCALE=True, DECAY=decay,
                          USE_HCOUNTER=False, HUGE=False, ALIGNED=True,
                          IDXB=31 if key_mode == 2 else 32, CHUNK=4096)
                out.append((f"apply/{pdt_name}/key{key_mode}/decay{decay}", _apply.apply_kernel, sig, cx))
            for rows, bb in ((1, 4096), (16, 256)):
                sig = dict(ttab=P64, T="i32", ltab=P64, SL="i32", ws="*fp32", found_inf_ptr="*fp32",
                           grad_scale_ptr="*fp32", beta1="fp32", omb1="fp32", beta2="fp32", omb2="fp32",
                           eps="fp32", decay="fp32", hash_counter="i32")
                cx = dict(PDT=pdt, KEY_MODE=key_mode, HAS_INF=True, HAS_SCALE=True, DECAY=1,
                          USE_HCOUNTER=True, HUGE=False, KEYBITS=32 if key_mode == 2 else 31,
                          ROWS=rows, BB=bb)
                out.append((f"local/{pdt_name}/key{key_mode}/bb{bb}", _local.local_step_kernel, sig, cx))
    sig = dict(ktab=P64, K="i32", hist="*i32", sst=P64, S="i32", stab=P64, cand=P64, found_inf_ptr="*fp32")
    out.append(("cand_refine", _select.cand_refine_kernel, sig,
                dict(HAS_INF=True, SHIFT=30, BITS=11, CHUNK=4096)))
    for first in (True, False):
        sig = dict(hist="*i32", sst=P64, S="i32", stab=P64, found_inf_ptr="*fp32")
        cx = dict(HAS_INF=True, FIRST=first, SHIFT=52 if first else 0, BITS=11)
        out.append((f"select/first{first}", _select.select_kernel, sig, cx))
    sig = dict(ttab=P64, T="i32", ws="*fp32", found_inf_ptr="*fp32", b1_hi="fp32", b1_lo="fp32",
               b2_hi="fp32", b2_lo="fp32", lr_hi="fp32", lr_lo="fp32")
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
                num_warps = 4 if name.startswith(("select", "prologue")) else 16 if name.startswith("local") else 8
                num_warps = int(os.environ.get("NW", num_warps))
                k = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                   options={"num_warps": num_warps})
                info = ""
                if verbose:
                    info = _ptxas_info(k.asm["ptx"], cap)
                results[f"{name}@sm{cap}"] = None
                if verbose:
                    print(f"{name}@sm{cap}: ok {info}", flush=True)
            except Exception as e:  # noqa: BLE001 - report every failure
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
        r = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
    return f"regs={regs[-1] if regs else '?'} spill_stores={spills[-1] if spills else '?'}"


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code = (
        "import sys, json; sys.path.insert(0, 'tests/kernels');"
        "from test_kernels_compile import compile_all;"
        "r = compile_all((90,), full=False);"
        "print(json.dumps({k: v for k, v in r.items() if v}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, failures


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    import triton  # noqa: F811

    caps = tuple(int(a) for a in sys.argv[1:] if a.isdigit()) or (90,)
    only = next((a for a in sys.argv[1:] if not a.isdigit()), None)
    res = compile_all(caps, only=only, verbose=True)
    bad = {k: v for k, v in res.items() if v}
    print(f"{len(res) - len(bad)}/{len(res)} variants compiled")
    sys.exit(1 if bad else 0)
