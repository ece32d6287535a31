"""CPU step time of maskopt's optimizers against torch's CPU AdamW, on the same tensors.

    python benchmarks/cpu_step.py                      # Llama-shaped parameter list, 30.0M params
    python benchmarks/cpu_step.py --size 1m            # 1.0M params
    python benchmarks/cpu_step.py --size 300m --only adamw-fused,mofo,rbcd,half   # 302M params
    python benchmarks/cpu_step.py --deepspeed          # + DeepSpeedCPUAdam (builds its op first)

Prints the median step time of each optimizer and its ratio to ``torch.optim.AdamW(fused=True)``
(the CPU AdamW a user runs) measured in the same run, repeats interleaved round-robin. HalfAdam
trains half of the tensors: its anchor is AdamW(fused=True) on the half it trains ("adamw-half").
Every optimizer steps the same parameter tensors (the values drift; the time does not depend on
them) and keeps its own state. ``--fresh-grads`` alternates two gradient sets instead of
repeating one (repeated gradients make the momentum converge and ties common).
Targets and results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from maskopt import HalfAdam, MoFO, RandomBCD, cpu_step

SIZES = {  # (hidden, layers, vocab)
    "1m": (128, 4, 1000),
    "30m": (512, 8, 8000),
    "300m": (1536, 8, 32000),
}


def llama_shapes(hidden: int, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    inter = int(hidden * 8 / 3 // 64 * 64) or hidden * 2
    kv = max(hidden // 4, 1)
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}."
        shapes += [
            (pre + "self_attn.q_proj.weight", (hidden, hidden)),
            (pre + "self_attn.k_proj.weight", (kv, hidden)),
            (pre + "self_attn.v_proj.weight", (kv, hidden)),
            (pre + "self_attn.o_proj.weight", (hidden, hidden)),
            (pre + "mlp.gate_proj.weight", (inter, hidden)),
            (pre + "mlp.up_proj.weight", (inter, hidden)),
            (pre + "mlp.down_proj.weight", (hidden, inter)),
            (pre + "input_layernorm.weight", (hidden,)),
            (pre + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def _deepspeed_cpu_adam(params):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=1e-3, weight_decay=0.0, adamw_mode=True)


def candidates(alpha: float) -> dict[str, Callable]:
    """name -> builder taking the named parameters."""

    def plain(named):
        return [p for _, p in named]

    return {
        "adamw-fused": lambda ps: torch.optim.AdamW(plain(ps), fused=True, weight_decay=0.0),
        "adamw-foreach": lambda ps: torch.optim.AdamW(plain(ps), foreach=True, weight_decay=0.0),
        "deepspeed-cpu-adam": lambda ps: _deepspeed_cpu_adam(plain(ps)),
        "mofo": lambda ps: MoFO(plain(ps), alpha=alpha),
        "mofo-gradient": lambda ps: MoFO(plain(ps), alpha=alpha, filter="gradient"),
        "mofo-block4096": lambda ps: MoFO(plain(ps), alpha=alpha, block_size=4096),
        "mofo-pytorch-path": lambda ps: MoFO(plain(ps), alpha=alpha, fused=False),
        "rbcd": lambda ps: RandomBCD(plain(ps), alpha=alpha),
        "rbcd-exact": lambda ps: RandomBCD(plain(ps), alpha=alpha, exact=True),
        "half": lambda ps: HalfAdam(ps, freeze="mask", seed=0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="30m")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    ap.add_argument("--only", default="", help="comma-separated candidate names (default: all but deepspeed)")
    ap.add_argument("--deepspeed", action="store_true", help="add DeepSpeedCPUAdam (JIT-builds its op)")
    ap.add_argument("--fresh-grads", action="store_true", help="alternate two gradient sets")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    every = candidates(args.alpha)
    names = [n for n in args.only.split(",") if n] or [n for n in every if n != "deepspeed-cpu-adam"]
    if args.deepspeed and "deepspeed-cpu-adam" not in names:
        names.insert(2, "deepspeed-cpu-adam")
    unknown = sorted(set(names) - set(every))
    if unknown:
        sys.exit(f"--only: unknown {unknown}; allowed: {', '.join(every)}")
    if "adamw-fused" not in names:
        names.insert(0, "adamw-fused")

    shapes = llama_shapes(*SIZES[args.size])
    gen = torch.Generator().manual_seed(0)
    named = [(n, torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)) for n, s in shapes]
    grad_sets = [[torch.randn(p.shape, generator=gen) * 1e-3 for _, p in named]]
    if args.fresh_grads:
        grad_sets.append([torch.randn(p.shape, generator=gen) * 1e-3 for _, p in named])
    numel = sum(p.numel() for _, p in named)
    compiled = "built" if cpu_step.available() else f"unavailable: {cpu_step.build_error()}"
    print(
        f"# {len(shapes)} tensors, {numel / 1e6:.1f}M params, fp32, alpha={args.alpha}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, compiled CPU step {compiled}, "
        f"{'fresh' if args.fresh_grads else 'repeated'} gradients"
    )

    def set_grads(step: int) -> None:
        for (_, p), g in zip(named, grad_sets[step % len(grad_sets)], strict=True):
            p.grad = g

    set_grads(0)
    optimizers = {}
    for name in names:
        try:
            optimizers[name] = every[name](named)
        except Exception as exc:  # DeepSpeedCPUAdam needs its op built; report and go on
            print(f"# {name}: not run ({type(exc).__name__}: {str(exc)[:200]})")
    if "half" in optimizers:
        half = optimizers["half"]
        half.step()  # its first step shows which tensors the round trains
        trained = [p for _, p in named if p in half.state]
        optimizers["adamw-half"] = torch.optim.AdamW(trained, fused=True, weight_decay=0.0)
    for step in range(args.warmup):
        set_grads(step)
        for opt in optimizers.values():
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for step in range(args.repeats):
        set_grads(step)
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["adamw-fused"])
    half_base = statistics.median(times["adamw-half"]) if "adamw-half" in times else None
    print(f"{'optimizer':<22}{'ms':>9}{'x fused':>9}{'x foreach':>11}")
    foreach = statistics.median(times["adamw-foreach"]) if "adamw-foreach" in times else None
    for name, samples in times.items():
        t = statistics.median(samples)
        vs_foreach = f"{t / foreach:>11.2f}" if foreach else f"{'':>11}"
        extra = f"   ({t / half_base:.2f}x adamw-half)" if name == "half" and half_base else ""
        print(f"{name:<22}{t * 1e3:>9.1f}{t / base:>9.2f}{vs_foreach}{extra}")


if __name__ == "__main__":
    main()
