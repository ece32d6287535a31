#!/usr/bin/env python
"""The sharded (FSDP2) MoFO step against the unsharded one on the same parameters.

    python benchmarks/fsdp_step.py             # one CUDA GPU: NCCL, world size 1, TinyLlama-1.1B shapes
    python benchmarks/fsdp_step.py --quick     # CPU smoke run: gloo, the Triton interpreter, tiny shapes

One process, a process group of one rank: every parameter is a DTensor with ``Shard(0)`` on a
one-device mesh, so the step runs the sharded launch sequence (level-by-level selects with a
fixed number of all-reduces) on data the size of the unsharded one. The ratio of the two
median step times is the cost of sharding the selection (target <= 1.2x on one GPU,
docs/performance.md). Prints one line per optimizer and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as bc


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="CPU smoke run (gloo, Triton interpreter, tiny shapes)"
    )
    ap.add_argument("--alpha", type=float, default=0.1)
    args = ap.parse_args(argv)
    quick = args.quick or not torch.cuda.is_available()
    if quick:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from maskopt import MoFO

    device = torch.device("cpu" if quick else "cuda")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29513")
    dist.init_process_group("gloo" if quick else "nccl", rank=0, world_size=1)
    try:
        mesh = init_device_mesh(device.type, (1,))
        # --quick: one small layer; every interpreted program costs milliseconds, so the smoke
        # run's time grows with the number of 4096-entry chunks
        smoke = dict(vocab=256, hidden=32, intermediate=88, layers=1, heads=2, kv_heads=1)
        shapes = bc.llama_shapes(**smoke) if quick else bc.llama_shapes()
        gen = torch.Generator().manual_seed(0)
        full = [(torch.randn(s, generator=gen) * 0.02).to(device) for _, s in shapes]
        grads = [(torch.randn(t.shape, generator=gen) * 1e-3).to(device) for t in full]
        times = {}
        for name in ("unsharded", "sharded"):
            if name == "unsharded":
                params = [torch.nn.Parameter(t.clone()) for t in full]
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.clone()
            else:
                params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
                for p, g in zip(params, grads, strict=True):
                    p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt = MoFO(params, lr=1e-5, alpha=args.alpha, fused=True)
            opt.step()  # state, plans, compiled kernels
            times[name] = bc.bench(opt.step, device, cpu_reps=1, cpu_warmup=0)
            print(
                f"MoFO fused, {name:9s}: {times[name]:9.3f} ms  ({bc.numel(shapes) / 1e6:.3g}M parameters, "
                f"{len(shapes)} tensors, {device})",
                flush=True,
            )
            del opt, params
        ratio = times["sharded"] / times["unsharded"]
        print(f"sharded / unsharded: {ratio:.3f}x")
        return dict(times, ratio=ratio)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
