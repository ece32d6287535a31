"""Kernel-time breakdown of one optimizer step on CUDA (torch.profiler), TinyLlama shapes.

    python benchmarks/profile_step.py [--methods "MoFO fused,RandomBCD fused"] [--steps 3]

Prints, per method, the CUDA kernels sorted by total device time over ``--steps`` steps."""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as bc
from step_bench import make_optimizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default="AdamW(fused=True),MoFO fused,MoFO(gradient) fused,RandomBCD fused")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    bc.quiet_warnings()
    gen = torch.Generator(device="cpu").manual_seed(0)
    named = [
        (n, torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)))
        for n, s in bc.llama_shapes()
    ]
    for _, p in named:
        p.grad = torch.randn(p.shape, device=device) * 1e-3
    for method in args.methods.split(","):
        opt = make_optimizer(method.strip(), named, 0.1)
        for _ in range(2):
            opt.step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                opt.step()
            torch.cuda.synchronize()
        print(f"\n## {method} ({args.steps} steps)")
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60
            )
        )
        del opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
