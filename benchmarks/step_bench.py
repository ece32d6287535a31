"""Optimizer step microbenchmarks: fused (Triton) and PyTorch paths against AdamW and the
official MoFO implementation's pattern.

    python benchmarks/step_bench.py                    # full run on a CUDA device (~15-25 min on an H100)
    python benchmarks/step_bench.py --quick            # end-to-end smoke run; on CPU uses the Triton interpreter
    python benchmarks/step_bench.py --cases tinyllama --methods "AdamW(fused=True),MoFO fused"

Cases: ``tinyllama`` (TinyLlama-1.1B's 201 parameter tensors, alpha=0.1), ``alpha`` (the same
shapes, alpha from 1% to 50%), ``sweep`` (1M to 1B parameters at alpha=0.1). For each case and
method: the median step time (triton.testing.do_bench on CUDA, warm-up excluded; on CPU a
perf_counter median), its ratio to torch.optim.AdamW(fused=True) on the same parameters, the
achieved bandwidth counting the method's minimal bytes (see ``_bench_common.minimal_bytes``)
as a share of the measured device copy bandwidth, the optimizer state and the peak extra
memory one step allocates (CUDA). A table goes to stdout, a CSV (with device, versions,
date and commit on every row) to ``--csv`` (default benchmarks/out/step_bench-<date>.csv).

The targets of docs/performance.md this checks (fp32, alpha=0.1, TinyLlama shapes, one H100
or H200): MoFO fused <= 1.15x AdamW(fused) (alpha=0.01: <= 1.0x); >= 6x faster than the
official pattern; RandomBCD fused <= 1.05x; HalfAdam <= 0.5x; >= 80% of copy bandwidth.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as bc

ALL_METHODS = [
    "AdamW(fused=True)",
    "AdamW(foreach=True)",
    "official loop+topk",
    "MoFO fused",
    "MoFO torch",
    "MoFO(gradient) fused",
    "MoFO(gradient) torch",
    "MoFO(bf16m) fused",
    "RandomBCD fused",
    "RandomBCD torch",
    "HalfAdam fused",
    "HalfAdam torch",
]
ALPHA_METHODS = ["MoFO fused", "MoFO torch", "official loop+topk", "RandomBCD fused"]
SWEEP_METHODS = [
    "AdamW(fused=True)",
    "AdamW(foreach=True)",
    "MoFO fused",
    "MoFO torch",
    "official loop+topk",
    "RandomBCD fused",
]
HP = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def make_optimizer(method: str, named, alpha: float):
    from maskopt import HalfAdam, MoFO, RandomBCD

    params = [p for _, p in named]
    fused = method.endswith("fused")
    if method == "AdamW(fused=True)":
        return torch.optim.AdamW(params, fused=True, **HP)
    if method == "AdamW(foreach=True)":
        return torch.optim.AdamW(params, foreach=True, **HP)
    if method == "official loop+topk":
        return bc.LoopTopkMoFO(params, alpha=alpha, **HP)
    if method.startswith("MoFO(bf16m)"):  # bf16 moments (moment_dtype=torch.bfloat16)
        return MoFO(params, alpha=alpha, fused=fused, moment_dtype=torch.bfloat16, **HP)
    if method.startswith("MoFO(gradient)"):
        return MoFO(params, alpha=alpha, filter="gradient", fused=fused, **HP)
    if method.startswith("MoFO"):
        return MoFO(params, alpha=alpha, fused=fused, **HP)
    if method.startswith("RandomBCD"):
        return RandomBCD(params, alpha=alpha, fused=fused, **HP)
    if method.startswith("HalfAdam"):
        try:
            return HalfAdam(list(named), fused=fused, **HP)
        except Exception:
            return HalfAdam(params, fused=fused, **HP)
    raise ValueError(f"unknown method {method!r}")


def run_case(case, shapes, alpha, methods, device, dtype, args, copy_bw, meta, rows, baselines):
    from maskopt.kernels import is_available

    fused_ok = is_available(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    named = [
        (n, torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device, dtype))) for n, s in shapes
    ]
    grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(device, dtype) for _, p in named]
    n = bc.numel(shapes)
    p_bytes = torch.empty((), dtype=dtype).element_size()
    key = (case if case != "alpha" else "tinyllama", n, str(dtype))
    for method in methods:
        if method.endswith("fused") and not fused_ok:
            print(f"  skip {method}: fused path unavailable on {device}")
            continue
        if method == "AdamW(fused=True)" and device.type == "cpu" and dtype != torch.float32:
            continue
        for (_, p), g in zip(named, grads, strict=True):
            p.requires_grad_(True)
            p.grad = g
        try:
            opt = make_optimizer(method, named, alpha)
            opt.step()  # creates the state, compiles the kernels
            ms = bc.bench(
                opt.step, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=args.cpu_reps
            )
            peak = bc.step_memory(opt.step, device)
            state = bc.state_bytes(opt)
            trainable = sum(p.numel() for p in opt.state) / n if method.startswith("HalfAdam") else 1.0
        except torch.cuda.OutOfMemoryError:
            print(f"  skip {method}: out of memory at {n} params")
            opt = None
            gc.collect()
            torch.cuda.empty_cache()
            continue
        del opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        path = (
            "interpreter"
            if (method.endswith("fused") and device.type == "cpu")
            else ("fused" if method.endswith("fused") or method == "AdamW(fused=True)" else "pytorch")
        )
        mbytes = bc.minimal_bytes(method, n, alpha, p_bytes, trainable)
        gbps = mbytes / (ms * 1e-3) / 1e9
        if method == "AdamW(fused=True)":
            baselines[key] = ms
        base = baselines.get(key)
        row = dict(
            meta,
            case=case,
            dtype=str(dtype).replace("torch.", ""),
            n_params=n,
            n_tensors=len(shapes),
            alpha=alpha if not method.startswith(("AdamW", "HalfAdam")) else "",
            method=method,
            path=path,
            median_ms=round(ms, 4),
            x_adamw_fused=round(ms / base, 3) if base else "",
            min_bytes=int(mbytes),
            gbps=round(gbps, 1),
            pct_copy_bw=round(100 * gbps / copy_bw, 1) if copy_bw else "",
            state_mb=round(state / 2**20, 1),
            step_peak_mb=round(peak / 2**20, 1) if peak is not None else "",
            trainable=round(trainable, 4),
        )
        rows.append(row)
        print(
            f"  {case:9s} {n / 1e6:9.1f}M {str(row['alpha']):>5s} {method:22s} {ms:10.3f} ms "
            f"{str(row['x_adamw_fused']):>7s}x  {gbps:8.1f} GB/s {str(row['pct_copy_bw']):>6s}%  "
            f"state {row['state_mb']:9.1f} MB  peak+ {str(row['step_peak_mb']):>8s} MB",
            flush=True,
        )
    del named, grads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small shapes and few repeats; on a CPU-only machine the fused rows run under "
        "the Triton interpreter (correctness smoke test, not a timing)",
    )
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--cases", default="tinyllama,alpha,sweep")
    ap.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(ALL_METHODS))
    ap.add_argument("--alphas", default="0.01,0.05,0.1,0.25,0.5")
    ap.add_argument("--sizes", default="1e6,4e6,16e6,64e6,256e6,1e9")
    ap.add_argument("--warmup-ms", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=200.0)
    ap.add_argument("--cpu-reps", type=int, default=5)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before maskopt.kernels builds its kernels
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bc.quiet_warnings()
    if args.quick:
        tiny = device.type == "cpu"
        args.alphas = "0.01,0.5" if tiny else "0.01,0.1,0.5"
        args.sizes = "65536" if tiny else "1e6,16e6"
        args.cpu_reps = min(args.cpu_reps, 2)
        args.rep_ms = min(args.rep_ms, 50.0)
    only = [m.strip() for m in args.methods.split(",")] if args.methods else None
    for m in only or []:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m!r}; choose from {ALL_METHODS}")

    meta = bc.metadata(device)
    copy_bw = bc.copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    print(
        f"# {meta['device']} ({device.type}), torch {meta['torch']}, triton {meta['triton']}, "
        f"maskopt {meta['maskopt']} @ {meta['commit']}, {meta['date']}, dtype {args.dtype}"
    )
    print(
        f"# copy bandwidth {copy_bw:.1f} GB/s (read+write)"
        + ("; fused rows run under the Triton interpreter: not timings" if device.type == "cpu" else "")
    )
    print(
        f"  {'case':9s} {'params':>10s} {'alpha':>5s} {'method':22s} {'median':>13s} {'xAdamW':>8s}  "
        f"{'achieved':>13s} {'%copy':>7s}  {'optimizer state':>18s}  {'step peak':>14s}"
    )

    def pick(methods):
        return [m for m in methods if only is None or m in only]

    rows: list[dict] = []
    baselines: dict = {}
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    tl_shapes = bc.tiny_llama_quick() if (args.quick and device.type == "cpu") else bc.llama_shapes()
    if "tinyllama" in cases:
        run_case(
            "tinyllama",
            tl_shapes,
            0.1,
            pick(ALL_METHODS),
            device,
            dtype,
            args,
            copy_bw,
            meta,
            rows,
            baselines,
        )
    if "alpha" in cases:
        if ("tinyllama", bc.numel(tl_shapes), str(dtype)) not in baselines:
            run_case(
                "tinyllama",
                tl_shapes,
                0.1,
                pick(["AdamW(fused=True)"]),
                device,
                dtype,
                args,
                copy_bw,
                meta,
                rows,
                baselines,
            )
        for a in (float(x) for x in args.alphas.split(",")):
            run_case(
                "alpha",
                tl_shapes,
                a,
                pick(ALPHA_METHODS),
                device,
                dtype,
                args,
                copy_bw,
                meta,
                rows,
                baselines,
            )
    if "sweep" in cases:
        for size in (int(float(x)) for x in args.sizes.split(",")):
            run_case(
                "sweep",
                bc.sweep_shapes(size),
                0.1,
                pick(SWEEP_METHODS),
                device,
                dtype,
                args,
                copy_bw,
                meta,
                rows,
                baselines,
            )

    path = args.csv or os.path.join(
        bc.ROOT, "benchmarks", "out", f"step_bench-{meta['date'].replace(':', '')}-{device.type}.csv"
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if rows:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        print(f"# wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
