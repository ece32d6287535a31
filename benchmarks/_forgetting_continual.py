"""Continual learning: four tasks in sequence, OP and BWT of next-byte accuracy.

Tasks (all held back from pre-training): English text -> codec tables -> ``email`` ->
``asyncio``. Each task gets a fixed number of steps with warmup and cosine decay and a fresh
optimizer; HalfAdam instead calls ``new_round()`` (a new half and fresh state), as HFT does.
``R[t][j]`` is the held-out accuracy on task j after task t; OP and BWT come from
``maskopt.metrics`` in both papers' conventions (MoFO divides BWT by T-1, HFT/TRACE by T).
"""

from __future__ import annotations

import time

import _forgetting_data as data
import _forgetting_optimizers as optimizers
import _forgetting_train as training


def continual_one(
    model,
    theta0,
    name: str,
    lr: float,
    seed: int,
    corpora: dict,
    evals: dict,
    before: dict,
    seq: int,
    batch: int,
    task_steps: int,
    device,
    progress,
) -> tuple[dict, list[dict]]:
    """One optimizer through the task sequence; its result row and its R-matrix cells."""
    from maskopt.metrics import backward_transfer, overall_performance

    tasks = list(data.CONTINUAL_TASKS)
    training.restore(model, theta0)
    r_acc, r_loss, cells = [], [], []
    t_start = time.perf_counter()
    opt = None
    for t, task in enumerate(tasks):
        if name == "halfadam" and opt is not None:
            opt.new_round()
        else:
            opt = optimizers.make_optimizer(name, model, lr, seed * 100 + t)
        batches = data.Batches(corpora[task].train, seq, batch, seed=seed * 100 + 10 + t)
        desc = f"continual {optimizers.LABELS[name]} seed {seed}: {t + 1}/{len(tasks)} {task}"
        with progress.bar(task_steps, desc) as bar:
            training.train_fixed(model, opt, batches, task_steps, device, bar)
        res = {j: training.evaluate(model, evals[j], batch, device) for j in tasks + ["code"]}
        r_loss.append([res[j][0] for j in tasks])
        r_acc.append([res[j][1] for j in tasks])
        cells += [
            dict(
                optimizer=name,
                lr=lr,
                seed=seed,
                after_task=t + 1,
                trained=task,
                eval_task=j,
                loss=res[j][0],
                acc=res[j][1],
            )
            for j in tasks + ["code"]
        ]
    wall = time.perf_counter() - t_start
    row = dict(
        optimizer=name,
        label=optimizers.LABELS[name],
        lr=lr,
        seed=seed,
        task_steps=task_steps,
        OP=overall_performance(r_acc),
        BWT=backward_transfer(r_acc),
        BWT_hft=backward_transfer(r_acc, convention="hft"),
        OP_loss=-overall_performance(r_loss, higher_is_better=False),
        BWT_loss=backward_transfer(r_loss, higher_is_better=False),
        code_forgetting=res["code"][0] - before["code"][0],
        wall_s=wall,
    )
    progress.say(
        f"  continual {row['label']:<17} seed {seed}: OP {row['OP']:.2f} %  BWT "
        f"{row['BWT']:+.2f} (HFT's {row['BWT_hft']:+.2f})  code loss "
        f"{row['code_forgetting']:+.3f}  {wall:.0f} s"
    )
    return row, cells


def continual_all(
    model,
    corpora: dict,
    names: list[str],
    lr: float,
    seeds: list[int],
    seq: int,
    batch: int,
    task_steps: int,
    eval_windows: int,
    device,
    progress,
) -> tuple[list[dict], list[dict]]:
    """Every optimizer and seed through the sequence from the same theta0; the model ends at theta0."""
    theta0 = training.snapshot(model)
    tasks = list(data.CONTINUAL_TASKS)
    evals = {t: data.eval_windows(corpora[t].held_out, seq, eval_windows) for t in tasks + ["code"]}
    before = {t: training.evaluate(model, evals[t], batch, device) for t in tasks + ["code"]}
    rows, cells = [], []
    for seed in seeds:
        for name in names:
            row, c = continual_one(
                model,
                theta0,
                name,
                lr,
                seed,
                corpora,
                evals,
                before,
                seq,
                batch,
                task_steps,
                device,
                progress,
            )
            rows.append(row)
            cells += c
    training.restore(model, theta0)
    return rows, cells
