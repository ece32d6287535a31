"""CPU step time of the PyTorch path against torch.optim.AdamW(foreach=True), same parameters.

    python benchmarks/cpu_step.py                 # Llama-shaped parameter list, ~34M params
    python benchmarks/cpu_step.py --hidden 256 --layers 4 --repeats 5   # smaller, quicker

Prints the median step time of each optimizer and its ratio to AdamW(foreach) measured in
the same run, repeats interleaved round-robin (target for MoFO: <= 2.5x, docs/performance.md).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from maskopt import HalfAdam, MoFO, RandomBCD


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


def build(make, shapes):
    gen = torch.Generator().manual_seed(0)
    named = [(n, torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)) for n, s in shapes]
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for _, p in named]
    for (_, p), g in zip(named, grads, strict=True):
        p.grad = g
    return make(named)


def time_step(opt, clock) -> float:
    start = clock()
    opt.step()
    return clock() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU time instead of wall clock (steadier on a shared machine)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = llama_shapes(args.hidden, args.layers, args.vocab)
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    print(
        f"# {len(shapes)} tensors, {numel / 1e6:.1f}M params, fp32, alpha={args.alpha}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )

    alpha = args.alpha
    candidates = {
        "AdamW(foreach=True)": lambda ps: torch.optim.AdamW(
            [p for _, p in ps], foreach=True, weight_decay=0.0
        ),
        "MoFO(momentum)": lambda ps: MoFO([p for _, p in ps], alpha=alpha),
        "MoFO(gradient)": lambda ps: MoFO([p for _, p in ps], alpha=alpha, filter="gradient"),
        "MoFO(block_size=4096)": lambda ps: MoFO([p for _, p in ps], alpha=alpha, block_size=4096),
        "MoFO(foreach=False)": lambda ps: MoFO([p for _, p in ps], alpha=alpha, foreach=False),
        "RandomBCD": lambda ps: RandomBCD([p for _, p in ps], alpha=alpha),
        "HalfAdam(category)": lambda ps: HalfAdam(ps, freeze="mask"),
    }
    clock = time.process_time if args.cpu_time else time.perf_counter
    optimizers = {name: build(make, shapes) for name, make in candidates.items()}
    for opt in optimizers.values():
        for _ in range(args.warmup):
            opt.step()
    # Round-robin repeats, so load from other processes hits every optimizer alike.
    times = {name: [] for name in optimizers}
    for _ in range(args.repeats):
        for name, opt in optimizers.items():
            times[name].append(time_step(opt, clock))
    base = statistics.median(times["AdamW(foreach=True)"])
    unit = "CPU ms" if args.cpu_time else "wall ms"
    print(f"{'optimizer':<24}{unit:>10}{'x AdamW':>10}")
    for name, samples in times.items():
        t = statistics.median(samples)
        print(f"{name:<24}{t * 1e3:>10.1f}{t / base:>10.2f}")


if __name__ == "__main__":
    main()
