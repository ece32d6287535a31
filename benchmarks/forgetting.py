#!/usr/bin/env python
"""Forgetting benchmark: pre-train a tiny Llama on Python code, fine-tune it on English.

    python benchmarks/forgetting.py            # default CPU setting (fits ~10 min on 2 cores)
    python benchmarks/forgetting.py --quick    # smoke test (< 1 min)
    python benchmarks/forgetting.py --size gpu --device cuda

1. Pre-train a small Llama-architecture causal LM (``transformers.LlamaConfig``, random init,
   byte-level tokens) on the Python standard library's sources; the checkpoint is cached in
   ``benchmarks/.cache`` so reruns skip this.
2. Fine-tune that same checkpoint on the English reference text of ``pydoc_data/topics.py``
   with AdamW, HalfAdam (HFT), MoFO (alpha 5 %, 15 %), MoFO with the gradient filter, and
   RandomBCD: same data order, learning rate, schedule and step budget for all.
3. For each: held-out fine-tuning loss (learning), increase of held-out pre-training loss
   (forgetting), ||theta - theta0|| relative to AdamW's, the fraction of entries ever moved and
   the time per step. A table on stdout, ``forgetting.csv`` and ``forgetting.png`` in ``--out``.
4. Continual learning: four tasks in sequence (English text, codec tables, the ``email`` and
   ``asyncio`` packages, all held back from pre-training) with AdamW, HalfAdam (a new round per
   task), MoFO and RandomBCD; OP and BWT of next-byte accuracy as both papers define them
   (``maskopt.metrics``). ``continual.csv`` and a panel of the plot.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
# Idle OpenMP threads sleep instead of spinning: on a shared machine, spinning threads that
# lose their core slow every parallel region down by an order of magnitude (measured: 2
# threads on 2 busy cores went from 0.2 to 3 s per step). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _forgetting_data as data  # noqa: E402

try:
    import maskopt  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seq: int
    batch: int
    pretrain_steps: int
    pretrain_lr: float
    steps: int  # fine-tuning steps per optimizer
    task_steps: int  # continual: steps per task
    lr: float  # fine-tuning lr (all optimizers)
    eval_windows: int
    task_eval_windows: int


SIZES = {
    "quick": Size(hidden=64, layers=2, heads=4, intermediate=176, seq=64, batch=16,
                  pretrain_steps=250, pretrain_lr=3e-3, steps=40, task_steps=20, lr=1e-3,
                  eval_windows=64, task_eval_windows=32),
    "cpu": Size(hidden=128, layers=4, heads=4, intermediate=352, seq=128, batch=16,
                pretrain_steps=500, pretrain_lr=3e-3, steps=120, task_steps=30, lr=1e-3,
                eval_windows=128, task_eval_windows=64),
    "gpu": Size(hidden=512, layers=8, heads=8, intermediate=1376, seq=256, batch=64,
                pretrain_steps=4000, pretrain_lr=1e-3, steps=600, task_steps=200, lr=3e-4,
                eval_windows=512, task_eval_windows=256),
}

# Optimizer names (see make_optimizer). Alphas: the MoFO paper's 5 % (continual) and 15 %
# (instruction tuning); the two ablations use 15 % to pair with MoFO 15 %.
ALL_OPTIMIZERS = ("adamw", "halfadam", "mofo5", "mofo15", "mofo15-grad", "rbcd15")
CONTINUAL_OPTIMIZERS = ("adamw", "halfadam", "mofo5", "rbcd5")
LABELS = {
    "adamw": "AdamW", "halfadam": "HalfAdam (HFT)", "mofo5": "MoFO a=5%", "mofo15": "MoFO a=15%",
    "mofo15-grad": "MoFO-grad a=15%", "rbcd15": "RandomBCD a=15%", "rbcd5": "RandomBCD a=5%",
    "mofo5-grad": "MoFO-grad a=5%",
}
BETAS = (0.9, 0.999)
WARMUP = 0.1
CLIP = 1.0


def make_optimizer(name: str, model: torch.nn.Module, lr: float, seed: int) -> torch.optim.Optimizer:
    common = dict(lr=lr, betas=BETAS, eps=1e-8, weight_decay=0.0)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **common)
    from maskopt import HalfAdam, MoFO, RandomBCD

    if name == "halfadam":
        return HalfAdam(model.named_parameters(), seed=seed, **common)
    if name.startswith("mofo"):
        alpha = int(name[4:].split("-")[0]) / 100
        return MoFO(model.parameters(), alpha=alpha,
                    filter="gradient" if name.endswith("-grad") else "momentum", **common)
    if name.startswith("rbcd"):
        return RandomBCD(model.parameters(), alpha=int(name[4:]) / 100, seed=seed, **common)
    raise ValueError(name)


KNOWN = tuple(LABELS)


# --------------------------------------------------------------------------------------------
# Helpers


class Progress:
    """A tqdm bar per phase (stderr), or nothing under --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def bar(self, total: int, desc: str):
        if self.quiet:
            return _NoBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False,
                    file=sys.stderr, mininterval=0.5)

    def say(self, msg: str) -> None:
        if self.quiet:
            print(msg, flush=True)
        else:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def schedule(steps: int):
    """Linear warmup over the first 10 % of steps, then cosine decay to 0 (lr multiplier)."""
    warm = max(1, int(round(WARMUP * steps)))

    def f(i: int) -> float:  # i = number of steps already taken
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm + 1) / max(1, steps - warm + 1))))

    return f


def default_threads() -> int:
    """All cores, less the ones other processes keep busy (1-minute load average)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):
        busy = 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(size: Size, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.heads, max_position_embeddings=size.seq,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int, device: torch.device) -> tuple[float, float]:
    """Mean next-byte loss (nats/byte) and top-1 accuracy (%) on fixed windows."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for chunk in windows.split(batch * 2):
        x = chunk.to(device, non_blocking=True)
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                    reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    model.train(was_training)
    return loss_sum / count, 100.0 * correct / count


@dataclasses.dataclass
class TrainStats:
    steps: int = 0
    compute_s: float = 0.0  # forward + backward + clip + optimizer step
    opt_s: float = 0.0  # optimizer step alone
    last_loss: float = float("nan")


def train(model, opt, batches: data.Batches, steps: int, device, bar, stats: TrainStats,
          moved: list[torch.Tensor] | None = None, prev: list[torch.Tensor] | None = None):
    """``steps`` AdamW-style steps with warmup + cosine and grad-norm clipping at 1.0."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps))
    params = [p for p in model.parameters()]
    ema = None
    model.train()
    for i in range(steps):
        x = batches.next().to(device, non_blocking=True)
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], CLIP)
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sched.step()
        stats.compute_s += t2 - t0
        stats.opt_s += t2 - t1
        stats.steps += 1
        if moved is not None:
            with torch.no_grad():
                for m, p, q in zip(moved, params, prev):
                    m |= p.ne(q)
                    q.copy_(p)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {i + 1}")
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        stats.last_loss = ema
        bar.update(1)
        if i % 10 == 0 or i == steps - 1:
            bar.set_postfix_str(f"loss {ema:.3f}")


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def restore(model, state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(model.parameters(), state):
            p.copy_(s)
            p.requires_grad_(True)
            p.grad = None


def distance(model, theta0: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return math.sqrt(sum(float((p.float() - q.float()).pow(2).sum()) for p, q in
                             zip(model.parameters(), theta0)))


# --------------------------------------------------------------------------------------------
# Phases


def pretrain(args, size: Size, corpora, device, progress: Progress):
    """The pre-trained checkpoint theta0, from the cache when this exact setting was run before."""
    code = corpora["code"]
    key_fields = dict(size=dataclasses.asdict(size), seed=args.seed, corpus=code.digest,
                      split=[data.CHUNK, data.HELD_OUT_EVERY], betas=[0.9, 0.95], wd=0.1, clip=CLIP,
                      warmup=WARMUP, version=1)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(args.cache) / f"pretrain-{args.size}-{key}.pt"
    model = build_model(size, args.seed).to(device)
    if cache.is_file() and not args.no_cache:
        blob = torch.load(cache, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        progress.say(f"pre-training: loaded cached checkpoint {cache} "
                     f"({blob['meta']['steps']} steps, took {blob['meta']['seconds']:.0f} s)")
        return model, blob["meta"]

    opt = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    batches = data.Batches(code.train, size.seq, size.batch, seed=args.seed)
    stats = TrainStats()
    t0 = time.perf_counter()
    with progress.bar(size.pretrain_steps, "pre-train on code") as bar:
        train(model, opt, batches, size.pretrain_steps, device, bar, stats)
    seconds = time.perf_counter() - t0
    meta = dict(steps=size.pretrain_steps, seconds=seconds, train_loss=stats.last_loss,
                tokens=size.pretrain_steps * size.batch * size.seq)
    if not args.no_cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                    "meta": meta}, tmp)
        os.replace(tmp, cache)
    progress.say(f"pre-training: {size.pretrain_steps} steps in {seconds:.0f} s, "
                 f"train loss {stats.last_loss:.3f}" + ("" if args.no_cache else f", cached in {cache}"))
    return model, meta


def finetune_all(args, size: Size, corpora, model, device, progress: Progress, lr: float):
    """Fine-tune theta0 on English with each optimizer; a result dict per optimizer."""
    theta0 = snapshot(model)
    code_eval = data.eval_windows(corpora["code"].held_out, size.seq, size.eval_windows)
    eng_eval = data.eval_windows(corpora["english"].held_out, size.seq, size.eval_windows)
    code0, code_acc0 = evaluate(model, code_eval, size.batch, device)
    eng0, eng_acc0 = evaluate(model, eng_eval, size.batch, device)
    progress.say(f"theta0 (lr {lr:g}): held-out loss code {code0:.3f}, English {eng0:.3f} "
                 f"nats/byte; accuracy code {code_acc0:.1f} %, English {eng_acc0:.1f} %")
    rows = [dict(optimizer="theta0", label="pre-trained", lr=lr, steps=0, ft_loss=eng0,
                 ft_acc=eng_acc0, learned=0.0, code_loss=code0, code_acc=code_acc0, forgetting=0.0,
                 dist=0.0, dist_rel=0.0, moved=0.0, ms_step=float("nan"), ms_opt=float("nan"),
                 wall_s=0.0)]
    for name in args.optimizers:
        restore(model, theta0)
        opt = make_optimizer(name, model, lr, args.seed)
        batches = data.Batches(corpora["english"].train, size.seq, size.batch, seed=args.seed + 1)
        prev = snapshot(model)
        moved = [torch.zeros_like(p, dtype=torch.bool) for p in prev]
        stats = TrainStats()
        t0 = time.perf_counter()
        with progress.bar(args.steps, f"fine-tune {LABELS[name]}") as bar:
            train(model, opt, batches, args.steps, device, bar, stats, moved, prev)
        wall = time.perf_counter() - t0
        eng, eng_acc = evaluate(model, eng_eval, size.batch, device)
        code, code_acc = evaluate(model, code_eval, size.batch, device)
        n = sum(m.numel() for m in moved)
        row = dict(optimizer=name, label=LABELS[name], lr=lr, steps=args.steps, ft_loss=eng,
                   ft_acc=eng_acc, learned=eng0 - eng, code_loss=code, code_acc=code_acc,
                   forgetting=code - code0, dist=distance(model, theta0), dist_rel=float("nan"),
                   moved=sum(int(m.sum()) for m in moved) / n,
                   ms_step=1000 * stats.compute_s / stats.steps,
                   ms_opt=1000 * stats.opt_s / stats.steps, wall_s=wall)
        rows.append(row)
        del opt
        progress.say(f"  {LABELS[name]:<17} English loss {eng:.3f} ({eng - eng0:+.3f})  "
                     f"code loss {code - code0:+.3f}  |dtheta| {row['dist']:.3f}  "
                     f"moved {100 * row['moved']:.1f} %  {row['ms_step']:.0f} ms/step")
    ref = next((r["dist"] for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        r["dist_rel"] = r["dist"] / ref if ref else float("nan")
    restore(model, theta0)
    return rows


def continual(args, size: Size, corpora, model, device, progress: Progress, lr: float):
    """Tasks in sequence; R[t][j] = held-out next-byte accuracy on task j after task t."""
    from maskopt.metrics import backward_transfer, overall_performance

    theta0 = snapshot(model)
    tasks = list(data.CONTINUAL_TASKS)
    evals = {t: data.eval_windows(corpora[t].held_out, size.seq, size.task_eval_windows)
             for t in tasks + ["code"]}
    before = {t: evaluate(model, evals[t], size.batch, device) for t in tasks + ["code"]}
    rows, cells = [], []
    for name in args.continual_optimizers:
        restore(model, theta0)
        R_acc, R_loss = [], []
        t_start = time.perf_counter()
        opt = None
        for t, task in enumerate(tasks):
            if name == "halfadam" and opt is not None:
                opt.new_round()  # HFT: a new half and fresh optimizer state per task
            else:
                opt = make_optimizer(name, model, lr, args.seed + t)
            batches = data.Batches(corpora[task].train, size.seq, size.batch,
                                   seed=args.seed + 100 + t)
            with progress.bar(args.task_steps, f"continual {LABELS[name]}: {t + 1}/{len(tasks)} {task}") as bar:
                train(model, opt, batches, args.task_steps, device, bar, TrainStats())
            res = {j: evaluate(model, evals[j], size.batch, device) for j in tasks + ["code"]}
            R_loss.append([res[j][0] for j in tasks])
            R_acc.append([res[j][1] for j in tasks])
            for j in tasks + ["code"]:
                cells.append(dict(optimizer=name, lr=lr, after_task=t + 1, trained=task, eval_task=j,
                                  loss=res[j][0], acc=res[j][1]))
        wall = time.perf_counter() - t_start
        code_loss, code_acc = res["code"]
        row = dict(optimizer=name, label=LABELS[name], lr=lr, task_steps=args.task_steps,
                   OP=overall_performance(R_acc), BWT=backward_transfer(R_acc),
                   BWT_hft=backward_transfer(R_acc, convention="hft"),
                   OP_loss=-overall_performance(R_loss, higher_is_better=False),
                   BWT_loss=backward_transfer(R_loss, higher_is_better=False),
                   code_forgetting=code_loss - before["code"][0], wall_s=wall,
                   R_acc=R_acc)
        rows.append(row)
        progress.say(f"  continual {LABELS[name]:<17} OP {row['OP']:.2f} %  BWT {row['BWT']:+.2f} % "
                     f"(HFT's BWT {row['BWT_hft']:+.2f})  code loss {row['code_forgetting']:+.3f}  "
                     f"{wall:.0f} s")
        del opt
    restore(model, theta0)
    return rows, cells, before


# --------------------------------------------------------------------------------------------
# Output


def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def finetune_table(rows) -> str:
    headers = ["optimizer", "lr", "English loss", "learned", "code loss", "forgetting",
               "|θ-θ0| / AdamW", "entries moved", "ms/step", "opt ms/step"]
    body = []
    for r in rows:
        pre = r["optimizer"] == "theta0"
        body.append([r["label"], f"{r['lr']:g}", f"{r['ft_loss']:.3f}",
                     "" if pre else f"{r['learned']:.3f}", f"{r['code_loss']:.3f}",
                     "" if pre else f"{r['forgetting']:+.3f}",
                     "" if pre else f"{r['dist_rel']:.2f}",
                     "" if pre else f"{100 * r['moved']:.1f} %",
                     "" if pre else f"{r['ms_step']:.0f}", "" if pre else f"{r['ms_opt']:.1f}"])
    return fmt_table(headers, body)


def matched_table(rows) -> str | None:
    """Forgetting interpolated at common fine-tuning losses, from an lr sweep.

    Each optimizer's (English loss, forgetting) points, taken in order of English loss, are
    joined by straight lines; the table reads them at English losses inside every optimizer's
    range (n/a outside it). This compares forgetting at equal learning.
    """
    pts: dict[str, list[tuple[float, float]]] = {}
    labels = {}
    for r in rows:
        if r["optimizer"] != "theta0":
            pts.setdefault(r["optimizer"], []).append((r["ft_loss"], r["forgetting"], r["dist"]))
            labels[r["optimizer"]] = r["label"]
    if not pts or min(len(v) for v in pts.values()) < 2:
        return None
    for v in pts.values():
        v.sort()
    lo = max(v[0][0] for v in pts.values())
    hi = min(v[-1][0] for v in pts.values())
    all_x = sorted(p[0] for v in pts.values() for p in v)
    if lo < hi:
        targets = [lo + (hi - lo) * f for f in (0.0, 0.5, 1.0)]
    else:  # no common range: three levels spread over all points, n/a where out of range
        targets = [all_x[len(all_x) // 4], all_x[len(all_x) // 2], all_x[3 * len(all_x) // 4]]

    def interp(v, x, k):
        for a, b in zip(v, v[1:]):
            if a[0] <= x <= b[0]:
                return a[k] if b[0] == a[0] else a[k] + (b[k] - a[k]) * (x - a[0]) / (b[0] - a[0])
        return None

    mid = targets[1]
    ref = interp(pts["adamw"], mid, 2) if "adamw" in pts else None
    headers = (["optimizer"] + [f"forgetting at English loss {x:.3f}" for x in targets]
               + [f"|θ-θ0| at {mid:.3f}" + (" / AdamW's" if ref else "")])
    body = []
    for name, v in pts.items():
        cells = [interp(v, x, 1) for x in targets]
        d = interp(v, mid, 2)
        d_txt = "n/a" if d is None else (f"{d / ref:.2f}" if ref else f"{d:.3f}")
        body.append([labels[name]] + ["n/a" if c is None else f"{c:+.3f}" for c in cells] + [d_txt])
    return fmt_table(headers, body)


def continual_table(rows) -> str:
    headers = ["optimizer", "lr", "OP (acc %)", "BWT (MoFO)", "BWT (HFT)", "BWT (loss)", "code forgetting"]
    body = [[r["label"], f"{r['lr']:g}", f"{r['OP']:.2f}", f"{r['BWT']:+.2f}", f"{r['BWT_hft']:+.2f}",
             f"{r['BWT_loss']:+.3f}", f"{r['code_forgetting']:+.3f}"] for r in rows]
    return fmt_table(headers, body)


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


COLORS = {"adamw": "C3", "halfadam": "C1", "mofo5": "C2", "mofo15": "C0", "mofo15-grad": "C4",
          "mofo5-grad": "C4", "rbcd15": "C7", "rbcd5": "C7"}
MARKERS = "os^Dv"


def _series(ax, rows, x, y, lrs, annotate):
    """One point per row (colour = optimizer, marker = lr); lines join an optimizer's lr sweep."""
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    for name in names:
        pts = sorted((r["lr"], r[x], r[y], r["label"]) for r in rows if r["optimizer"] == name)
        color = COLORS.get(name, "k")
        if len(pts) > 1:
            ax.plot([q[1] for q in pts], [q[2] for q in pts], color=color, lw=1, alpha=0.6, zorder=2)
        for i, (lr, px, py, label) in enumerate(pts):
            ax.scatter(px, py, color=color, marker=MARKERS[lrs.index(lr) % len(MARKERS)], s=45,
                       zorder=3, label=label if i == 0 else None)
        if annotate:
            lr, px, py, label = pts[len(pts) // 2]
            ax.annotate(label.split(" (")[0], (px, py), fontsize=6.5, xytext=(4, 3),
                        textcoords="offset points")


def plot(path: Path, ft_rows: list[dict], cl_rows: list[dict] | None, title: str) -> None:
    """Forgetting vs learning, forgetting vs distance, and (continual) OP vs BWT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ft_points = [r for r in ft_rows if r["optimizer"] != "theta0"]
    cl_rows = cl_rows or []
    panels = (2 if ft_points else 0) + (1 if cl_rows else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.2), dpi=90, squeeze=False)
    axes = list(axes[0])
    lrs = sorted({r["lr"] for r in ft_points} | {r["lr"] for r in cl_rows})
    sweep = len(lrs) > 1
    lr_note = ("; lr " + ", ".join(f"{MARKERS[i % len(MARKERS)]} {lr:g}" for i, lr in enumerate(lrs))
               if sweep else f"; lr {lrs[0]:g}")
    if ft_points:
        ax = axes[0]
        _series(ax, ft_points, "ft_loss", "forgetting", lrs, annotate=False)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_xlabel("fine-tuning loss, held-out English (nats/byte)\n← learns more")
        ax.set_ylabel("forgetting: Δ held-out code loss\n← forgets less")
        ax.set_title("forgetting vs learning" + lr_note, fontsize=9)
        ax.legend(fontsize=7, loc="best")
        ax = axes[1]
        # In a sweep, AdamW's distance differs per lr: plot absolute distances there.
        key, xlabel = ("dist", "‖θ − θ0‖") if sweep else ("dist_rel", "‖θ − θ0‖ relative to AdamW's")
        _series(ax, ft_points, key, "forgetting", lrs, annotate=True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("forgetting: Δ held-out code loss")
        ax.set_title("distance from the pre-trained model", fontsize=9)
    if cl_rows:
        ax = axes[-1]
        _series(ax, cl_rows, "BWT", "OP", lrs, annotate=True)
        ax.set_xlabel("BWT (accuracy points, MoFO's definition)\nforgets less →")
        ax.set_ylabel("OP: mean final accuracy (%)")
        ax.set_title(f"continual learning, {len(data.CONTINUAL_TASKS)} tasks" + lr_note, fontsize=9)
        if not ft_points:
            ax.legend(fontsize=7, loc="best")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _lrs(s: str) -> list[float]:
    out = []
    for part in s.split(","):
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a learning rate or a comma-separated list, got {s!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"learning rates must be finite and > 0, got {part!r}")
        out.append(v)
    return out


def _names(s: str) -> list[str]:
    names = [p.strip().lower() for p in s.split(",") if p.strip()]
    bad = [n for n in names if n not in KNOWN]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown optimizer(s) {bad or s!r}; choose from {', '.join(KNOWN)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Forgetting benchmark: pre-train a tiny Llama on stdlib code, fine-tune on "
                    "English with AdamW / HalfAdam / MoFO / RandomBCD, measure learning and forgetting.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-test setting (same as --size quick)")
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="model/data preset: quick, cpu (default) or gpu")
    p.add_argument("--mode", choices=["all", "finetune", "continual"], default="all",
                   help="which experiments to run")
    p.add_argument("--continual", action="store_true", help="only the continual-learning experiment "
                   "(same as --mode continual)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="fine-tuning steps per optimizer (default: the preset's)")
    p.add_argument("--task-steps", type=_positive_int, default=None,
                   help="continual learning: steps per task (default: the preset's)")
    p.add_argument("--pretrain-steps", type=_positive_int, default=None,
                   help="pre-training steps (default: the preset's)")
    p.add_argument("--lr", type=_lrs, default=None,
                   help="fine-tuning learning rate for every optimizer; a comma-separated list runs "
                        "a sweep of the fine-tuning experiment (default: the preset's)")
    p.add_argument("--optimizers", type=_names, default=list(ALL_OPTIMIZERS),
                   help="comma-separated fine-tuning optimizers")
    p.add_argument("--continual-optimizers", type=_names, default=list(CONTINUAL_OPTIMIZERS),
                   help="comma-separated continual-learning optimizers")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: the cores not busy with other work, "
                        "from the load average)")
    p.add_argument("--out", default=str(HERE / "out"), help="output directory (CSV, PNG)")
    p.add_argument("--cache", default=str(HERE / ".cache"), help="pre-trained checkpoint cache")
    p.add_argument("--no-cache", action="store_true", help="always pre-train; never read or write the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars (for CI logs)")
    args = p.parse_args(argv)
    if args.quick and args.size not in (None, "quick"):
        p.error(f"--quick conflicts with --size {args.size}")
    args.size = "quick" if args.quick else (args.size or "cpu")
    if args.continual:
        if args.mode == "finetune":
            p.error("--continual conflicts with --mode finetune")
        args.mode = "continual"
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(dev)
    except RuntimeError as e:
        p.error(f"--device {args.device!r} is not a torch device ({e})")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu, cuda, cuda:N or auto, got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device {args.device} requested but CUDA is not available in this torch "
                    f"({torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    args.device = device
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    size = SIZES[args.size]
    size = dataclasses.replace(size, pretrain_steps=args.pretrain_steps or size.pretrain_steps)
    args.steps = args.steps or size.steps
    args.task_steps = args.task_steps or size.task_steps
    lrs = args.lr or [size.lr]
    torch.set_num_threads(args.threads or default_threads())
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(args.quiet)
    t_all = time.perf_counter()

    import transformers

    corpora = data.load_corpora()
    setting = (f"size {args.size}: Llama {size.layers} layers x {size.hidden} hidden, {size.heads} heads, "
               f"seq {size.seq}, batch {size.batch}; seed {args.seed}; device {args.device}, "
               f"{torch.get_num_threads()} threads")
    versions = (f"Python {platform.python_version()}, torch {torch.__version__}, "
                f"transformers {transformers.__version__}, {platform.machine()} {platform.system()}")
    progress.say(f"forgetting benchmark -- {setting}\n  {versions}")
    for c in corpora.values():
        progress.say("  " + c.describe())

    model, meta = pretrain(args, size, corpora, args.device, progress)
    n_params = sum(p.numel() for p in model.parameters())

    ft_rows: list[dict] = []
    if args.mode in ("all", "finetune"):
        for lr in lrs:
            progress.say(f"fine-tuning on English: {args.steps} steps, lr {lr:g} (warmup {WARMUP:.0%} "
                         f"+ cosine), batch {size.batch} x {size.seq} bytes, {n_params / 1e6:.2f} M params")
            ft_rows += finetune_all(args, size, corpora, model, args.device, progress, lr)
    cl_rows, cells, before = [], [], {}
    if args.mode in ("all", "continual"):
        for lr in lrs:
            progress.say(f"continual learning: tasks {' -> '.join(data.CONTINUAL_TASKS)}, "
                         f"{args.task_steps} steps each, lr {lr:g}")
            r, c, before = continual(args, size, corpora, model, args.device, progress, lr)
            cl_rows += r
            cells += c

    total = time.perf_counter() - t_all
    print()
    print(f"# {setting}\n# {versions}\n# total wall time {total:.0f} s")
    if ft_rows:
        print(f"\nFine-tuning on English ({args.steps} steps per optimizer); held-out losses in nats/byte; "
              "forgetting = increase of the held-out code (pre-training) loss")
        print(finetune_table(ft_rows))
        if len(lrs) > 1:
            matched = matched_table(ft_rows)
            if matched:
                print("\nForgetting at equal learning (linear interpolation along each optimizer's lr sweep)")
                print(matched)
        fields = ["optimizer", "label", "lr", "steps", "ft_loss", "ft_acc", "learned", "code_loss",
                  "code_acc", "forgetting", "dist", "dist_rel", "moved", "ms_step", "ms_opt", "wall_s"]
        write_csv(out / "forgetting.csv", ft_rows, fields)
    if cl_rows:
        print(f"\nContinual learning ({' -> '.join(data.CONTINUAL_TASKS)}, {args.task_steps} steps per task); "
              "OP/BWT on held-out next-byte accuracy (%), BWT (loss) in nats/byte (negative = forgot)")
        print(continual_table(cl_rows))
        write_csv(out / "continual.csv", cl_rows,
                  ["optimizer", "label", "lr", "task_steps", "OP", "BWT", "BWT_hft", "OP_loss",
                   "BWT_loss", "code_forgetting", "wall_s"])
        write_csv(out / "continual_matrix.csv", cells,
                  ["optimizer", "lr", "after_task", "trained", "eval_task", "loss", "acc"])
    written = []
    if ft_rows:
        written.append(out / "forgetting.csv")
    if cl_rows:
        written += [out / "continual.csv", out / "continual_matrix.csv"]
    if ft_rows or cl_rows:
        plot(out / "forgetting.png", ft_rows or [], cl_rows, f"{setting}\n{versions}")
        written.append(out / "forgetting.png")
        print(f"\nwrote {', '.join(str(f) for f in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
