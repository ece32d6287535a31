"""Fine-tuning the pre-trained checkpoint on English until the held-out English loss plateaus.

Every run starts from the same theta0 and differs only in optimizer, lr and seed (the seed
sets the data order and the random selections of HalfAdam and RandomBCD; theta0 is the same
for every seed). The lr warms up linearly, then stays constant; the run is evaluated at its
best point on the validation windows. Learning and forgetting are then measured on windows
the stopping rule never saw: held-out English (test half) and held-out code. Each evaluation
also records the held-out code loss, so forgetting can be read along the training curve.
"""

from __future__ import annotations

import dataclasses
import time

import _forgetting_data as data
import _forgetting_optimizers as optimizers
import _forgetting_train as training
import torch


@dataclasses.dataclass(frozen=True)
class FinetuneBudget:
    batch: int
    eval_every: int
    patience: int  # evaluations without an improvement of more than `tolerance`
    tolerance: float  # nats/byte
    max_steps: int
    warmup: int
    english_windows: int  # per half (validation for stopping, test for the reported loss)
    code_windows: int


@dataclasses.dataclass
class EvalSets:
    seq: int
    english_val: torch.Tensor
    english_test: torch.Tensor
    code: torch.Tensor


def eval_sets(corpora: dict, seq: int, budget: FinetuneBudget) -> EvalSets:
    """Alternate held-out English windows go to validation and test, so the two never overlap."""
    english = data.eval_windows(corpora["english"].held_out, seq, 10**9)
    val, test = english[0::2], english[1::2]
    pick = lambda w: w[torch.linspace(0, len(w) - 1, min(len(w), budget.english_windows)).round().long()]  # noqa: E731
    return EvalSets(
        seq=seq,
        english_val=pick(val),
        english_test=pick(test),
        code=data.eval_windows(corpora["code"].held_out, seq, budget.code_windows),
    )


def reference_row(model, sets: EvalSets, budget: FinetuneBudget, device, size: str) -> dict:
    """theta0's held-out losses, the baseline every run is measured against."""
    eng, eng_acc = training.evaluate(model, sets.english_test, budget.batch, device)
    code, code_acc = training.evaluate(model, sets.code, budget.batch, device)
    return dict(
        size=size,
        optimizer="theta0",
        label="pre-trained",
        ft_loss=eng,
        ft_acc=eng_acc,
        code_loss=code,
        code_acc=code_acc,
    )


def finetune_one(
    model,
    theta0: list[torch.Tensor],
    ref: dict,
    name: str,
    lr: float,
    seed: int,
    corpora: dict,
    sets: EvalSets,
    budget: FinetuneBudget,
    device,
    progress,
) -> dict:
    """One early-stopped fine-tuning run from theta0; the model is left at its best point."""
    training.restore(model, theta0)
    opt = optimizers.make_optimizer(name, model, lr, seed)
    batches = data.Batches(corpora["english"].train, sets.seq, budget.batch, seed=1000 + seed)
    rule = training.StopRule(
        eval_every=budget.eval_every,
        patience=budget.patience,
        tolerance=budget.tolerance,
        max_steps=budget.max_steps,
        warmup=budget.warmup,
    )

    curve = []  # (step, validation English loss, held-out code loss) at every evaluation

    def validation_loss(step: int) -> float:
        english = training.evaluate(model, sets.english_val, budget.batch, device)[0]
        code_loss = training.evaluate(model, sets.code, budget.batch, device)[0]
        curve.append(dict(step=step, english_val=english, forgetting=code_loss - ref["code_loss"]))
        return english

    t0 = time.perf_counter()
    desc = f"fine-tune {optimizers.LABELS[name]} lr {lr:g} seed {seed}"
    with progress.bar(budget.max_steps, desc) as bar:
        result = training.train_until_plateau(model, opt, batches, rule, device, bar, validation_loss)
    wall = time.perf_counter() - t0
    eng, eng_acc = training.evaluate(model, sets.english_test, budget.batch, device)
    code, code_acc = training.evaluate(model, sets.code, budget.batch, device)
    row = dict(
        size=ref["size"],
        optimizer=name,
        label=optimizers.LABELS[name],
        lr=lr,
        seed=seed,
        best_step=result.best_step,
        steps=result.steps,
        stopped_by=result.stopped_by,
        ft_loss=eng,
        ft_acc=eng_acc,
        learned=ref["ft_loss"] - eng,
        code_loss=code,
        code_acc=code_acc,
        forgetting=code - ref["code_loss"],
        dist=training.distance(model, theta0),
        moved=training.fraction_moved(model, theta0),
        ms_step=result.stats.ms_per_step(),
        ms_opt=result.stats.opt_ms_per_step(),
        wall_s=wall,
        curve=curve,
    )
    progress.say(
        f"  {row['label']:<17} lr {lr:<6g} seed {seed}: best at step {result.best_step:>4} "
        f"of {result.steps} ({result.stopped_by}); English {eng:.3f} ({-row['learned']:+.3f}), "
        f"code {row['forgetting']:+.3f}, |dtheta| {row['dist']:.2f}, moved "
        f"{100 * row['moved']:.1f} %, {row['ms_step']:.0f} ms/step"
    )
    return row


def finetune_sweep(
    model,
    corpora: dict,
    names: list[str],
    lrs: list[float],
    seeds: list[int],
    seq: int,
    budget: FinetuneBudget,
    device,
    progress,
    size: str,
    on_row=None,
) -> tuple[dict, list[dict]]:
    """theta0's reference row and one row per (lr, seed, optimizer); the model ends at theta0."""
    theta0 = training.snapshot(model)
    sets = eval_sets(corpora, seq, budget)
    ref = reference_row(model, sets, budget, device, size)
    progress.say(
        f"theta0: held-out English {ref['ft_loss']:.3f} nats/byte ({ref['ft_acc']:.1f} %), "
        f"code {ref['code_loss']:.3f} ({ref['code_acc']:.1f} %)"
    )
    rows = []
    for lr in lrs:
        for seed in seeds:
            for name in names:
                row = finetune_one(
                    model, theta0, ref, name, lr, seed, corpora, sets, budget, device, progress
                )
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    training.restore(model, theta0)
    return ref, rows
