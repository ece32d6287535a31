"""Cost of maskopt under DeepSpeed ZeRO on CPU: step time and collectives against torch's AdamW.

    python benchmarks/deepspeed_step.py                       # 2 ranks, stages 1-3, ~4.6M params
    python benchmarks/deepspeed_step.py --stages 2 --hidden 64 --layers 2 --steps 3 --repeats 1   # quick
    python benchmarks/deepspeed_step.py --offload --stages 2 3  # ZeRO-Offload, against DeepSpeedCPUAdam

Starts ``--world`` processes (gloo, ``DS_ACCELERATOR=cpu``, one torch thread each). For every
ZeRO stage it trains the same Llama-shaped parameter list with each optimizer through
``deepspeed.initialize`` and measures, per ``engine.step()`` (the optimizer step plus
DeepSpeed's own gradient and parameter traffic): the median wall time, the time inside the
client optimizer's ``step()``, the collective calls and bytes every rank makes, and the time
rank 0 spends inside them, waiting for the other ranks included (counted on
``torch.distributed``; each rank makes the same calls). The gradients are fixed random tensors
(the loss is ``sum_i <p_i, g_i>``), so forward and backward cost next to nothing and are not
timed. Optimizers run one after another, ``--repeats`` rounds; ratios are against AdamW in
the same run.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "reduce_scatter",
)


def llama_shapes(hidden: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    inter = int(hidden * 8 / 3 // 64 * 64) or hidden * 2
    kv = max(hidden // 4, 1)
    layer = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (inter, hidden),
        (inter, hidden),
        (hidden, inter),
        (hidden,),
        (hidden,),
    ]
    return [(vocab, hidden), *[s for _ in range(layers) for s in layer], (hidden,), (vocab, hidden)]


class FixedGradients(torch.nn.Module):
    """Loss ``sum_i <p_i, g_i>``: the gradient of ``p_i`` is ``g_i``."""

    def __init__(self, shapes):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for i, shape in enumerate(shapes):
            setattr(self, f"w{i}", torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02))

    def forward(self, *grads):
        return sum((p * g).sum() for p, g in zip(self.parameters(), grads, strict=True))


def _deepspeed_cpu_adam(params):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=1e-3, weight_decay=0.0, adamw_mode=True)


def optimizers(alpha: float, offload: bool = False):
    from maskopt import HalfAdam, MoFO, RandomBCD

    if offload:  # ZeRO-Offload: DeepSpeed's own CPU Adam is the anchor
        return {
            "DeepSpeedCPUAdam": _deepspeed_cpu_adam,
            f"MoFO(alpha={alpha:g})": lambda ps: MoFO(ps, lr=1e-3, alpha=alpha),
            f"RandomBCD(alpha={alpha:g})": lambda ps: RandomBCD(ps, lr=1e-3, alpha=alpha),
            "HalfAdam(mask)": lambda ps: HalfAdam(ps, lr=1e-3, freeze="mask"),
        }
    return {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0, foreach=True),
        f"MoFO(alpha={alpha:g})": lambda ps: MoFO(ps, lr=1e-3, alpha=alpha),
        f"RandomBCD(alpha={alpha:g})": lambda ps: RandomBCD(ps, lr=1e-3, alpha=alpha),
        f"RandomBCD(alpha={alpha:g},exact)": lambda ps: RandomBCD(ps, lr=1e-3, alpha=alpha, exact=True),
    }


class Counter:
    """Counts the calls and tensor bytes of torch.distributed's collectives while ``on``."""

    def __init__(self):
        self.on, self.calls, self.bytes, self.seconds = False, 0, 0, 0.0
        for name in COLLECTIVES:
            real = getattr(dist, name, None)
            if real is not None:
                setattr(dist, name, self._wrap(real))

    def _wrap(self, real):
        def counted(*args, **kwargs):
            if self.on:
                self.calls += 1
                tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
                lists = [t for a in args if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)]
                self.bytes += sum(t.numel() * t.element_size() for t in (tensors[:1] or lists))
                start = time.perf_counter()
                out = real(*args, **kwargs)
                self.seconds += time.perf_counter() - start
                return out
            return real(*args, **kwargs)

        return counted


def run_one(stage, make, shapes, grads, args, counter):
    import deepspeed

    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if args.offload:  # the optimizer and its state in host memory, stepping the client optimizer
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    model = FixedGradients(shapes)
    opt = make(model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    inner = {"t": 0.0}
    real_step = opt.step

    def timed_step(*a, **k):  # DeepSpeed calls the client optimizer's step() itself
        start = time.perf_counter()
        out = real_step(*a, **k)
        inner["t"] += time.perf_counter() - start
        return out

    opt.step = timed_step
    times, inner_times, calls, nbytes, waits = [], [], [], [], []
    for i in range(args.warmup + args.steps):
        engine.backward(engine(*grads))
        dist.barrier()
        inner["t"], counter.calls, counter.bytes, counter.seconds = 0.0, 0, 0, 0.0
        counter.on = True
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        counter.on = False
        if i >= args.warmup:
            times.append(elapsed)
            inner_times.append(inner["t"])
            calls.append(counter.calls)
            nbytes.append(counter.bytes)
            waits.append(counter.seconds)
    engine.destroy()
    return times, inner_times, calls, nbytes, waits


def worker(rank, args, port):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(args.world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(args.world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    import deepspeed

    # The CPU backend would JIT-compile a shared-memory all-reduce kernel (minutes) that only
    # inference_all_reduce uses; training runs on gloo alone.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.utils.logger.setLevel(logging.ERROR)
    counter = Counter()  # before DeepSpeed's backend keeps references to the collectives
    deepspeed.init_distributed(dist_backend="gloo")
    shapes = llama_shapes(args.hidden, args.layers, args.vocab)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    makes = optimizers(args.alpha, args.offload)
    anchor = next(iter(makes))
    if rank == 0:
        numel = sum(torch.Size(s).numel() for s in shapes)
        print(
            f"# DeepSpeed {deepspeed.__version__}, torch {torch.__version__}, {args.world} ranks (gloo, CPU, "
            f"{args.threads} thread(s) each), {numel / 1e6:.2f}M params in {len(shapes)} tensors, "
            f"{args.steps} timed steps x {args.repeats} rounds after {args.warmup} warm-up"
            + (", ZeRO-Offload (offload_optimizer: cpu)" if args.offload else "")
        )
        print(
            f"{'stage':<6}{'optimizer':<28}{'engine.step ms':>15}{'ratio':>7}{'opt.step ms':>13}"
            f"{'collectives':>13}{'MB':>9}{'in them ms':>14}"
        )
    for stage in args.stages:
        results = {name: ([], [], [], [], []) for name in makes}
        for _ in range(args.repeats):
            for name, make in makes.items():
                for acc, got in zip(
                    results[name], run_one(stage, make, shapes, grads, args, counter), strict=True
                ):
                    acc.extend(got)
        base = statistics.median(results[anchor][0])
        for name, (times, inner, calls, nbytes, waits) in results.items():
            med = statistics.median(times)
            if rank == 0:
                print(
                    f"{stage:<6}{name:<28}{med * 1e3:>15.2f}{med / base:>7.2f}{statistics.median(inner) * 1e3:>13.2f}"
                    f"{statistics.median(calls):>13.0f}{statistics.median(nbytes) / 1e6:>9.2f}"
                    f"{statistics.median(waits) * 1e3:>14.2f}",
                    flush=True,
                )
    dist.barrier()
    dist.destroy_process_group()
    # With torch 2.13 and gloo, a gloo worker thread releasing a finished collective's tensors
    # during the interpreter's shutdown can abort the process ("terminate called without an
    # active exception"): leave without the shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="processes (default 2)")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the optimizers (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument(
        "--offload",
        action="store_true",
        help="ZeRO-Offload (offload_optimizer: cpu; stages 2 and 3) against DeepSpeedCPUAdam",
    )
    args = ap.parse_args()
    if args.offload and 1 in args.stages:
        args.stages = [s for s in args.stages if s != 1] or [2]  # offload needs stage 2 or 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.world)


if __name__ == "__main__":
    main()
