"""Training loops of the forgetting benchmark: evaluation, a fixed schedule, and early stopping.

Every step is AdamW-style: loss, backward, gradient-norm clipping at 1.0, ``opt.step()``.
``train_until_plateau`` evaluates every ``eval_every`` steps and stops when the held-out loss
has not improved by more than ``tolerance`` for ``patience`` evaluations; with ``lr_drops``
it first divides the lr by ``LR_DROP_DIVISOR`` at each plateau (pre-training), and stops at the
next one. The model is left at its best evaluated point.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import _forgetting_data as data
import torch
import torch.nn.functional as F

CLIP = 1.0
LR_DROP_DIVISOR = 4.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int, device: torch.device) -> tuple[float, float]:
    """Mean next-byte loss (nats/byte) and top-1 accuracy (%) on fixed windows."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for chunk in windows.split(batch * 4):
        x = chunk.to(device, non_blocking=True)
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        loss_sum += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    model.train(was_training)
    return loss_sum / count, 100.0 * correct / count


@torch.no_grad()
def log_probs(model, windows: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Next-byte log-probabilities (windows, seq - 1, 256) on the CPU."""
    was_training = model.training
    model.eval()
    out = [
        torch.log_softmax(model(input_ids=chunk.to(device)).logits[:, :-1].float(), -1).cpu()
        for chunk in windows.split(batch * 4)
    ]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def kl_to_reference(
    model, windows: torch.Tensor, reference: torch.Tensor, batch: int, device: torch.device
) -> float:
    """Mean KL(model || reference) per byte (nats), reference given as ``log_probs`` of the same windows."""
    was_training = model.training
    model.eval()
    total, count, start = 0.0, 0, 0
    for chunk in windows.split(batch * 4):
        logp = torch.log_softmax(model(input_ids=chunk.to(device)).logits[:, :-1].float(), -1)
        ref = reference[start : start + len(chunk)].to(logp.device)
        total += float((logp.exp() * (logp - ref)).sum())
        count += logp.shape[0] * logp.shape[1]
        start += len(chunk)
    model.train(was_training)
    return total / count


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def restore(model, state: list[torch.Tensor]) -> None:
    """Put the weights back and make every parameter trainable again: HalfAdam freezes half of
    them through ``requires_grad``, and the next run must not inherit that."""
    with torch.no_grad():
        for p, s in zip(model.parameters(), state, strict=True):
            p.copy_(s)
            p.requires_grad_(True)
            p.grad = None


def distance(model, theta0: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return math.sqrt(
            sum(
                float((p.float() - q.float()).pow(2).sum())
                for p, q in zip(model.parameters(), theta0, strict=True)
            )
        )


def fraction_moved(model, theta0: list[torch.Tensor]) -> float:
    """The fraction of entries that differ from theta0."""
    with torch.no_grad():
        moved = sum(int(p.ne(q).sum()) for p, q in zip(model.parameters(), theta0, strict=True))
    return moved / sum(q.numel() for q in theta0)


@dataclasses.dataclass
class TrainStats:
    steps: int = 0
    compute_s: float = 0.0  # forward + backward + clip + optimizer step
    opt_s: float = 0.0  # optimizer step alone
    last_loss: float = float("nan")  # running mean of the training loss

    def ms_per_step(self) -> float:
        return 1000 * self.compute_s / max(1, self.steps)

    def opt_ms_per_step(self) -> float:
        return 1000 * self.opt_s / max(1, self.steps)


def _set_lr(opt, base_lrs: list[float], multiplier: float) -> None:
    for group, lr in zip(opt.param_groups, base_lrs, strict=True):
        group["lr"] = lr * multiplier


def clip_gradients(model, max_norm: float) -> None:
    """``clip_grad_norm_`` that also takes the sparse gradients BAdam's ratio mode leaves (the norm of
    a sparse gradient is that of its stored entries)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not any(g.is_sparse for g in grads):
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
        return
    values = [g.coalesce().values() if g.is_sparse else g for g in grads]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in values]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale)


def _step(model, opt, batches: data.Batches, device, stats: TrainStats) -> None:
    x = batches.next().to(device, non_blocking=True)
    sync(device)
    t0 = time.perf_counter()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    clip_gradients(model, CLIP)
    sync(device)
    t1 = time.perf_counter()
    opt.step()
    sync(device)
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss became {value} at step {stats.steps + 1}")
    stats.compute_s += t2 - t0
    stats.opt_s += t2 - t1
    stats.steps += 1
    stats.last_loss = value if stats.steps == 1 else 0.95 * stats.last_loss + 0.05 * value


def warmup_cosine(steps: int, warmup_fraction: float = 0.1) -> Callable[[int], float]:
    """lr multiplier before step ``i`` (0-based): linear warmup, then cosine decay to 0."""
    warm = max(1, int(round(warmup_fraction * steps)))

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm + 1) / max(1, steps - warm + 1))))

    return f


def train_fixed(
    model, opt, batches: data.Batches, steps: int, device, bar, stats: TrainStats | None = None
) -> TrainStats:
    """``steps`` steps with 10 % linear warmup and cosine decay."""
    stats = stats or TrainStats()
    base = [g["lr"] for g in opt.param_groups]
    multiplier = warmup_cosine(steps)
    model.train()
    for i in range(steps):
        _set_lr(opt, base, multiplier(i))
        _step(model, opt, batches, device, stats)
        bar.update(1)
        if i % 10 == 0 or i == steps - 1:
            bar.set_postfix_str(f"loss {stats.last_loss:.3f}")
    _set_lr(opt, base, 1.0)
    return stats


@dataclasses.dataclass(frozen=True)
class StopRule:
    eval_every: int
    patience: int  # evaluations without an improvement of more than `tolerance`
    tolerance: float  # nats/byte
    max_steps: int
    warmup: int  # steps of linear warmup, then a constant lr
    lr_drops: int = 0  # plateaus answered by dividing the lr before stopping


@dataclasses.dataclass
class PlateauResult:
    best_step: int
    best_loss: float
    steps: int
    stopped_by: str  # "plateau" or "max_steps"
    curve: list[dict]  # one entry per evaluation: step, lr multiplier, held-out loss
    stats: TrainStats


def train_until_plateau(
    model,
    opt,
    batches: data.Batches,
    rule: StopRule,
    device,
    bar,
    held_out_loss: Callable[[int], float],
    before_step: Callable[[int], None] | None = None,
) -> PlateauResult:
    """Train until the held-out loss stops improving; leaves the model at its best evaluation.

    ``held_out_loss(step)`` evaluates the model after ``step`` steps. The step-0 evaluation
    counts, so a run that only gets worse returns the starting point. ``before_step(step)`` runs
    before each step (LISA draws its layers there).
    """
    stats = TrainStats()
    base = [g["lr"] for g in opt.param_groups]
    drops_left, lr_mult = rule.lr_drops, 1.0
    loss0 = held_out_loss(0)
    curve = [dict(step=0, lr_mult=lr_mult, loss=loss0)]
    best_step, best_loss, best_state = 0, loss0, snapshot(model)
    reference, since_improved = loss0, 0
    stopped_by = "max_steps"
    model.train()
    for step in range(1, rule.max_steps + 1):
        _set_lr(opt, base, lr_mult * min(1.0, step / max(1, rule.warmup)))
        if before_step is not None:
            before_step(step)
        _step(model, opt, batches, device, stats)
        bar.update(1)
        if step % rule.eval_every and step != rule.max_steps:
            continue
        loss = held_out_loss(step)
        curve.append(dict(step=step, lr_mult=lr_mult, loss=loss))
        if loss < best_loss:
            best_step, best_loss, best_state = step, loss, snapshot(model)
        if loss < reference - rule.tolerance:
            reference, since_improved = loss, 0
        else:
            since_improved += 1
        bar.set_postfix_str(f"held-out {loss:.3f} best {best_loss:.3f}@{best_step}")
        if since_improved >= rule.patience:
            if drops_left == 0:
                stopped_by = "plateau"
                break
            drops_left -= 1
            lr_mult /= LR_DROP_DIVISOR
            reference, since_improved = best_loss, 0
    restore(model, best_state)
    _set_lr(opt, base, 1.0)
    return PlateauResult(
        best_step=best_step,
        best_loss=best_loss,
        steps=stats.steps,
        stopped_by=stopped_by,
        curve=curve,
        stats=stats,
    )
