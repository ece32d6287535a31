"""Fine-tuning the pre-trained checkpoint on English until the held-out English loss plateaus.

Every run starts from the same theta0 and differs only in method, lr and seed (the seed
sets the data order and the random selections of HalfAdam, RandomBCD, BAdam and LISA; theta0 is
the same for every seed). The lr warms up linearly, then stays constant; the run is evaluated at
its best point on the validation windows. Learning and forgetting are then measured on windows
the stopping rule never saw: held-out English (test half) and held-out code, with the KL
divergence from theta0's next-byte distribution on the held-out English (RL's Razor's measure).
Each evaluation also records the held-out code loss, so forgetting can be read along the
training curve. WiSE-FT rows interpolate each AdamW run's best point back toward theta0.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import _forgetting_data as data
import _forgetting_optimizers as optimizers
import _forgetting_peers as peers
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
    english_test_logp: torch.Tensor | None = None  # theta0's, for the KL of every run


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


def measure(
    model, theta0: list[torch.Tensor], ref: dict, sets: EvalSets, budget: FinetuneBudget, device
) -> dict:
    """Learning, forgetting, KL to theta0 on held-out English, distance and fraction moved of ``model``."""
    eng, eng_acc = training.evaluate(model, sets.english_test, budget.batch, device)
    code, code_acc = training.evaluate(model, sets.code, budget.batch, device)
    return dict(
        ft_loss=eng,
        ft_acc=eng_acc,
        learned=ref["ft_loss"] - eng,
        code_loss=code,
        code_acc=code_acc,
        forgetting=code - ref["code_loss"],
        kl=training.kl_to_reference(model, sets.english_test, sets.english_test_logp, budget.batch, device),
        dist=training.distance(model, theta0),
        moved=training.fraction_moved(model, theta0),
    )


def _trainer(name: str, model, lr: float, seed: int) -> peers.Trainer:
    if optimizers.is_peer(name):
        return peers.setup(name, model, lr, seed, optimizers.BETAS, optimizers.EPS)
    return peers.Trainer(model, optimizers.make_optimizer(name, model, lr, seed), None, lambda: model)


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
) -> tuple[dict, torch.nn.Module]:
    """One early-stopped fine-tuning run of a copy of ``model`` (at theta0): its row and the model
    at its best point (LoRA merged into the weights)."""
    # A copy per run: peft wraps the modules it adapts and BAdam hooks the parameters, so nothing of
    # one run may reach the next.
    trainer = _trainer(name, copy.deepcopy(model), lr, seed)
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
        english = training.evaluate(trainer.module, sets.english_val, budget.batch, device)[0]
        code_loss = training.evaluate(trainer.module, sets.code, budget.batch, device)[0]
        curve.append(dict(step=step, english_val=english, forgetting=code_loss - ref["code_loss"]))
        return english

    t0 = time.perf_counter()
    desc = f"fine-tune {optimizers.LABELS[name]} lr {lr:g} seed {seed}"
    with progress.bar(budget.max_steps, desc) as bar:
        result = training.train_until_plateau(
            trainer.module,
            trainer.optimizer,
            batches,
            rule,
            device,
            bar,
            validation_loss,
            before_step=trainer.before_step,
        )
    wall = time.perf_counter() - t0
    trained = trainer.finish()
    row = dict(
        size=ref["size"],
        optimizer=name,
        label=optimizers.LABELS[name],
        lr=lr,
        seed=seed,
        best_step=result.best_step,
        steps=result.steps,
        stopped_by=result.stopped_by,
        **measure(trained, theta0, ref, sets, budget, device),
        ms_step=result.stats.ms_per_step(),
        ms_opt=result.stats.opt_ms_per_step(),
        wall_s=wall,
        curve=curve,
    )
    progress.say(
        f"  {row['label']:<17} lr {lr:<6g} seed {seed}: best at step {result.best_step:>4} "
        f"of {result.steps} ({result.stopped_by}); English {row['ft_loss']:.3f} ({-row['learned']:+.3f}), "
        f"code {row['forgetting']:+.3f}, KL {row['kl']:.3f}, |dtheta| {row['dist']:.2f}, moved "
        f"{100 * row['moved']:.1f} %, {row['ms_step']:.0f} ms/step"
    )
    return row, trained


def wise_ft_rows(
    tuned, theta0: list[torch.Tensor], ref: dict, adamw_row: dict, sets: EvalSets, budget, device, progress
) -> list[dict]:
    """WiSE-FT: the AdamW run's weights pulled back toward theta0, theta0 + lambda (theta - theta0),
    measured at every lambda of WISE_LAMBDAS. ``tuned`` ends at lambda 1 again."""
    theta = training.snapshot(tuned)
    rows = []
    for lam in optimizers.WISE_LAMBDAS:
        t0 = time.perf_counter()
        with torch.no_grad():
            for p, a, b in zip(tuned.parameters(), theta0, theta, strict=True):
                p.copy_(a + lam * (b - a))
        name = f"{optimizers.WISE}{round(100 * lam)}"
        row = dict(
            adamw_row,
            optimizer=name,
            label=optimizers.LABELS[name],
            stopped_by="interpolation",
            **measure(tuned, theta0, ref, sets, budget, device),
            ms_step=float("nan"),
            ms_opt=float("nan"),
            wall_s=time.perf_counter() - t0,
            curve=[],
        )
        rows.append(row)
        progress.say(
            f"  {row['label']:<17} lr {row['lr']:<6g} seed {row['seed']}: English {row['ft_loss']:.3f}, "
            f"code {row['forgetting']:+.3f}, KL {row['kl']:.3f}, |dtheta| {row['dist']:.2f}"
        )
    training.restore(tuned, theta)
    return rows


def run_order(names: list[str]) -> list[str]:
    """The methods to train, in order: WiSE-FT needs no run of its own but needs AdamW's."""
    order = [n for n in names if n != optimizers.WISE]
    if optimizers.WISE in names and "adamw" not in order:
        order.insert(0, "adamw")
    return order


def finetune_sweep(
    model,
    corpora: dict,
    names: list[str],
    lrs: list[float] | dict[str, list[float]],
    seeds: list[int],
    seq: int,
    budget: FinetuneBudget,
    device,
    progress,
    size: str,
    on_row=None,
) -> tuple[dict, list[dict]]:
    """theta0's reference row and one row per (lr, seed, method), plus WiSE-FT's rows after each AdamW
    run when ``names`` has "wiseft"; ``lrs`` is one list for all or a list per method. ``model``
    stays at theta0."""
    theta0 = training.snapshot(model)
    sets = eval_sets(corpora, seq, budget)
    ref = reference_row(model, sets, budget, device, size)
    sets.english_test_logp = training.log_probs(model, sets.english_test, budget.batch, device)
    progress.say(
        f"theta0: held-out English {ref['ft_loss']:.3f} nats/byte ({ref['ft_acc']:.1f} %), "
        f"code {ref['code_loss']:.3f} ({ref['code_acc']:.1f} %)"
    )
    lrs_of = lrs if isinstance(lrs, dict) else dict.fromkeys(names, lrs)
    order = run_order(names)
    lrs_for = lambda n: lrs_of.get(n) or lrs_of.get(optimizers.WISE) or []  # noqa: E731
    all_lrs = sorted({lr for n in order for lr in lrs_for(n)})
    rows = []
    for lr in all_lrs:
        for seed in seeds:
            for name in order:
                if lr not in lrs_for(name):
                    continue
                row, tuned = finetune_one(
                    model, theta0, ref, name, lr, seed, corpora, sets, budget, device, progress
                )
                new = [row]
                if name == "adamw" and optimizers.WISE in names:
                    new += wise_ft_rows(tuned, theta0, ref, row, sets, budget, device, progress)
                rows += new
                if on_row is not None:
                    for r in new:
                        on_row(r)
    return ref, rows
