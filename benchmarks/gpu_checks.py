"""Hardware checks of the fused (Triton) path that only a GPU can answer, one command each.

    python benchmarks/gpu_checks.py all                 # every check on cuda (about 3 min on an H200)
    python benchmarks/gpu_checks.py bits                # GPU bits == the interpreter's bits
    python benchmarks/gpu_checks.py all --device cpu    # dry run: tiny sizes, the interpreter, CPU

Checks (each prints one ``CHECK <name>: PASS|FAIL|SKIP ...`` line, then its numbers):

- ``bits``: three MoFO / RandomBCD(exact) steps on fp32 and bf16 tensors, on the device and
  again in a subprocess under the Triton interpreter on the CPU; parameters and moments must be
  equal bit for bit (the kernels use IEEE division and square root and no FMA contraction).
- ``graph``: forward + backward + step captured in one CUDA graph and replayed, against the same
  steps run eagerly; then 20 eager steps of another optimizer with fresh gradient tensors, and
  the graph replayed again (what it points to must still be alive).
- ``sync``: ``torch.cuda.set_sync_debug_mode("error")`` around fused steps whose gradients are
  new tensors every step (no host synchronisation, no blocking host-to-device copy).
- ``big``: a 65.5M-entry tensor (TinyLlama's embedding): the first MoFO step (the exact
  fallback, spread over many programs) and steady steps, against ``AdamW(fused=True)`` on the
  same tensor; the target is a first step of at most 3 steady ones. The CPU dry run spreads
  its small tensor's selects too.
- ``wrap``: a bf16 tensor of 2**31 + 2**24 entries whose momenta are almost all zero (one
  histogram bin holds more than 2**31 of them): exactly k entries move.
- ``devices``: a model split over two GPUs steps like the PyTorch path (SKIP with one GPU).

Exit status: 0 when no check FAILs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("bits", "graph", "sync", "big", "wrap", "devices")


def _report(name: str, ok: bool | None, detail: str) -> bool:
    verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    print(f"CHECK {name}: {verdict} {detail}", flush=True)
    return ok is not False


# -- bits ------------------------------------------------------------------------------------------


def _bits_run(device: str, small: bool) -> dict:
    """Three steps of each optimizer on fixed data; every parameter and moment, on the CPU."""
    import torch

    from maskopt import MoFO, RandomBCD

    # the interpreter runs a launch program by program: sizes it replays in about a minute
    shapes = [(1000,), (37, 129), (5003,)] if small else [(4096,), (37, 129), (20_011,), (3, 4099)]
    out = {}
    for name, make in (
        ("mofo", lambda ps: MoFO(ps, lr=1e-2, alpha=0.1, weight_decay=0.1, fused=True)),
        (
            "mofo_grad_decay_all",
            lambda ps: MoFO(
                ps,
                lr=1e-2,
                alpha=0.2,
                filter="gradient",
                mask_weight_decay=False,
                weight_decay=0.1,
                fused=True,
            ),
        ),  # fmt: skip
        ("rbcd_exact", lambda ps: RandomBCD(ps, lr=1e-2, alpha=0.1, exact=True, seed=3, fused=True)),
    ):
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            params = [
                torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device, dtype)) for s in shapes
            ]
            opt = make(params)
            for step in range(3):
                for p in params:
                    g = torch.randn(p.shape, generator=gen) * (1e-3 if step != 1 else 1e-1)
                    p.grad = g.to(device, dtype)
                opt.step()
            key = f"{name}/{str(dtype).removeprefix('torch.')}"
            for i, p in enumerate(params):
                out[f"{key}/p{i}"] = p.detach().cpu()
                out[f"{key}/m{i}"] = opt.state[p]["exp_avg"].cpu()
                out[f"{key}/v{i}"] = opt.state[p]["exp_avg_sq"].cpu()
    return out


def check_bits(device: str, small: bool) -> bool:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "interpreted.pt"
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, __file__, "_bits_worker", "--out", str(ref)] + (["--small"] if small else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            return _report("bits", False, f"the interpreter run failed:\n{proc.stderr[-3000:]}")
        interpreted = torch.load(ref, weights_only=True)
    here = _bits_run(device, small)
    differing = {k: int((here[k].view(-1) != interpreted[k].view(-1)).sum()) for k in here}
    bad = {k: n for k, n in differing.items() if n}
    total = sum(t.numel() for t in here.values())
    detail = f"{len(here)} tensors, {total} values; interpreter run {time.perf_counter() - t0:.0f} s"
    if bad:
        detail += "; differing values per tensor: " + ", ".join(f"{k}={n}" for k, n in sorted(bad.items()))
    return _report("bits", not bad, detail)


# -- graph -------------------------------------------------------------------------------------


def _model(device: str, seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256), torch.nn.LayerNorm(256)
    ).to(device)


def check_graph(device: str, small: bool) -> bool:
    import torch

    from maskopt import MoFO

    if device != "cuda":
        return _report("graph", None, "needs CUDA")
    data = [
        torch.randn(64, 256, device=device, generator=torch.Generator(device).manual_seed(s))
        for s in range(8)
    ]

    def loss_of(model, x):
        return model(x).square().mean()

    eager, captured = _model(device, 0), _model(device, 0)
    opt_e = MoFO(eager.parameters(), lr=1e-3, alpha=0.1, fused=True)
    opt_c = MoFO(captured.parameters(), lr=1e-3, alpha=0.1, fused=True)
    static_x = data[0].clone()
    # warm-up on a side stream (kernels compiled, state and workspaces built), gradients kept
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in data[:3]:
            for model, opt in ((eager, opt_e), (captured, opt_c)):
                opt.zero_grad(set_to_none=False)
                loss_of(model, x).backward()
                opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt_c.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = loss_of(captured, static_x)
        static_loss.backward()
        opt_c.step()

    def replay_and_compare(xs, tag):
        worst = 0.0
        for x in xs:
            opt_e.zero_grad(set_to_none=False)
            loss_of(eager, x).backward()
            opt_e.step()
            static_x.copy_(x)
            opt_c.zero_grad(set_to_none=False)
            graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(eager.parameters(), captured.parameters(), strict=True):
            worst = max(worst, float((a - b).abs().max()))
        return worst

    first = replay_and_compare(data[3:5], "first")
    # other tensors churn every host-side table: another optimizer, fresh gradients each step
    other = _model(device, 1)
    opt_o = MoFO(other.parameters(), lr=1e-3, alpha=0.1, fused=True)
    for step in range(20):
        opt_o.zero_grad(set_to_none=True)
        loss_of(other, data[step % 8]).backward()
        opt_o.step()
    after = replay_and_compare(data[5:8], "after churn")
    ok = first < 1e-5 and after < 1e-5
    return _report(
        "graph", ok, f"max |eager - replayed| {first:.3g}, after 20 steps of another optimizer {after:.3g}"
    )


# -- sync ------------------------------------------------------------------------------------------


def check_sync(device: str, small: bool) -> bool:
    import torch

    from maskopt import MoFO, RandomBCD

    if device != "cuda":
        return _report("sync", None, "needs CUDA")
    failures = []
    for make in (
        lambda ps: MoFO(ps, lr=1e-3, alpha=0.1, fused=True),
        lambda ps: RandomBCD(ps, lr=1e-3, alpha=0.1, exact=True, fused=True),
    ):
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in ((4096, 1024), (5003,), (64,))]
        opt = make(params)
        for _ in range(2):  # warm-up: compile, state, plans
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)  # a new tensor at a new address every step
                opt.step()
        except RuntimeError as e:
            failures.append(str(e).splitlines()[0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return _report("sync", not failures, "; ".join(failures) or "3 steps with fresh gradients, twice")


# -- big ---------------------------------------------------------------------------------------------


def check_big(device: str, small: bool) -> bool:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _bench_common as bc

    from maskopt import MoFO

    shape = (1000, 64) if small else (32_000, 2048)
    gen = torch.Generator().manual_seed(0)
    p0 = (torch.randn(shape, generator=gen) * 0.02).to(device)
    g = (torch.randn(shape, generator=gen) * 1e-3).to(device)

    def fresh(make):
        p = torch.nn.Parameter(p0.clone())
        p.grad = g.clone()
        return make([p])

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    make_mofo = lambda ps: MoFO(ps, lr=1e-5, alpha=0.1, fused=True)  # noqa: E731
    from maskopt.kernels import launch

    # the dry run's tensor is below spread_min: spread its selects as a long tensor's are
    spread = launch.config(spread_min=1 << 12) if small else contextlib.nullcontext()
    with spread:
        fresh(make_mofo).step()  # compiles every kernel, the fallback included
        firsts = []
        for _ in range(1 if small else 3):
            opt = fresh(make_mofo)
            sync()
            t0 = time.perf_counter()
            opt.step()  # step 1: the threshold is unknown, the exact fallback runs
            sync()
            firsts.append((time.perf_counter() - t0) * 1e3)
        steady = bc.bench(opt.step, torch.device(device), cpu_reps=2)
        adamw = fresh(lambda ps: torch.optim.AdamW(ps, lr=1e-5, weight_decay=0.0, fused=device == "cuda"))
        adamw.step()
        base = bc.bench(adamw.step, torch.device(device), cpu_reps=2)
        first = statistics.median(firsts)
        detail = (
            f"{shape[0] * shape[1] / 1e6:.1f}M entries: first step {first:.2f} ms ({first / steady:.2f}x a steady "
            f"step), steady {steady:.3f} ms, AdamW(fused) {base:.3f} ms, steady / AdamW {steady / base:.3f}x"
        )
    return _report("big", True if small else first <= 3 * steady, detail)


# -- wrap --------------------------------------------------------------------------------------------


def check_wrap(device: str, small: bool) -> bool:
    import torch

    from maskopt import MoFO, topk_count

    n = (1 << 20) + 4096 if small else (1 << 31) + (1 << 24)
    if device == "cuda" and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        return _report("wrap", None, "needs about 30 GB")
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=device))
    grad = torch.zeros(n, dtype=torch.bfloat16, device=device)
    grad[:: 1 << 12] = 1.0  # a few nonzero momenta; every other |m| is 0, all in one bin
    p.grad = grad
    # decay lands only on the selected entries: they leave 1.0, every other entry keeps it
    opt = MoFO([p], lr=0.1, alpha=0.1, weight_decay=0.5, fused=True, moment_dtype=torch.bfloat16)
    opt.step()
    moved = int((p.detach() != 1.0).sum())
    k = topk_count(n, 0.1)
    return _report("wrap", moved == k, f"n = {n}, moved {moved}, k = {k}")


# -- devices ---------------------------------------------------------------------------------------


def check_devices(device: str, small: bool) -> bool:
    import torch

    from maskopt import MoFO

    if device != "cuda" or torch.cuda.device_count() < 2:
        return _report("devices", None, "needs two GPUs")
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        layers = [torch.nn.Linear(512, 512).to("cuda:0"), torch.nn.Linear(512, 512).to("cuda:1")]
        params = [p for layer in layers for p in layer.parameters()]
        opt = MoFO(params, lr=1e-2, alpha=0.1, fused=fused)
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(p.device)
            opt.step()
        results.append([p.detach().cpu() for p in params])
    worst = max(float((a - b).abs().max()) for a, b in zip(*results, strict=True))
    return _report("devices", worst < 1e-5, f"max |fused - PyTorch path| {worst:.3g} over two devices")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("check", choices=(*CHECKS, "all", "_bits_worker"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true", help="tiny sizes (implied by --device cpu)")
    ap.add_argument("--out", help="(internal) where the interpreter worker writes its tensors")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.check == "_bits_worker":
        import torch

        torch.save(_bits_run("cpu", args.small), args.out)
        return 0
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before maskopt.kernels is first imported
    small = args.small or args.device == "cpu"
    ok = True
    for name in CHECKS if args.check == "all" else (args.check,):
        t0 = time.perf_counter()
        try:
            ok &= globals()[f"check_{name}"](args.device, small)
        except Exception as e:  # one failing check must not hide the others' results
            ok &= _report(name, False, f"raised {type(e).__name__}: {e}")
        print(f"  ({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
