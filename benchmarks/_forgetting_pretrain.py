"""Pre-training a checkpoint of the forgetting benchmark until its held-out code loss plateaus.

AdamW (betas 0.9/0.95, weight decay 0.1), batch 16 windows of the size's context, linear
warmup over 200 steps to the size's peak lr, then constant. The held-out code loss (512 fixed
windows) is evaluated every 250 steps; when it has not improved by more than 0.01 nats/byte
for 3 evaluations (750 steps) the lr is divided by 4, twice, and the third such plateau ends
the run. The best evaluated weights are kept, stored in float16, and evaluated again after
that rounding: the recipe's held-out losses are those of the shipped file.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path

import _forgetting_data as data
import _forgetting_models as models
import _forgetting_train as training
import torch

BATCH = 16
EVAL_WINDOWS = 512
RULE = dict(eval_every=250, patience=3, tolerance=0.01, warmup=200, lr_drops=2)
SEED = 0


def pretrain(size: str, corpora: dict, device: torch.device, progress, directory: Path, threads: int) -> dict:
    """Pre-train ``size`` from a random init and write its checkpoint; returns the recipe."""
    import transformers

    shape = models.SIZES[size]
    model = models.build_model(shape, SEED).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    code = corpora["code"]
    code_eval = data.eval_windows(code.held_out, shape.seq, EVAL_WINDOWS)
    eng_eval = data.eval_windows(corpora["english"].held_out, shape.seq, EVAL_WINDOWS)
    opt = torch.optim.AdamW(model.parameters(), lr=shape.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    batches = data.Batches(code.train, shape.seq, BATCH, seed=SEED)
    rule = training.StopRule(max_steps=shape.pretrain_max_steps, **RULE)
    progress.say(
        f"pre-training --size {size}: {n_params / 1e6:.2f} M parameters, peak lr "
        f"{shape.pretrain_lr:g}, at most {rule.max_steps} steps; held-out code loss every "
        f"{rule.eval_every} steps"
    )
    t0 = time.perf_counter()

    def held_out(step: int) -> float:
        loss = training.evaluate(model, code_eval, BATCH, device)[0]
        progress.say(f"  step {step:>6}: held-out code loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)")
        return loss

    with progress.bar(rule.max_steps, f"pre-train {size}") as bar:
        result = training.train_until_plateau(model, opt, batches, rule, device, bar, held_out)
    seconds = time.perf_counter() - t0

    recipe = dict(
        size=size,
        shape=dataclasses.asdict(shape),
        parameters=n_params,
        command=models.rebuild_command(size)
        if threads == 1
        else f"python benchmarks/forgetting.py --pretrain --size {size} --threads {threads}",
        seed=SEED,
        batch=BATCH,
        optimizer="AdamW betas (0.9, 0.95), weight decay 0.1, clip 1.0",
        stop_rule=dict(
            RULE,
            max_steps=rule.max_steps,
            lr_drop_divisor=training.LR_DROP_DIVISOR,
            eval_windows=EVAL_WINDOWS,
        ),
        steps_run=result.steps,
        best_step=result.best_step,
        stopped_by=result.stopped_by,
        bytes_seen=result.steps * BATCH * shape.seq,
        train_bytes=int(code.train.numel()),
        seconds=round(seconds, 1),
        threads=threads,
        device=str(device),
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        machine=f"{platform.machine()} {platform.system()}",
        corpus_digest=code.digest,
        english_digest=corpora["english"].digest,
        curve_columns=["step", "lr", "held-out code loss"],
        curve=[[c["step"], shape.pretrain_lr * c["lr_mult"], round(c["loss"], 5)] for c in result.curve],
    )
    recipe = models.save_checkpoint(model, size, recipe, directory)
    # The numbers users will see are those of the float16 file, so measure them on it.
    stored, _ = models.load_checkpoint(size, directory)
    stored = stored.to(device)
    code_loss, code_acc = training.evaluate(stored, code_eval, BATCH, device)
    eng_loss, eng_acc = training.evaluate(stored, eng_eval, BATCH, device)
    recipe.update(
        held_out_code_loss=round(code_loss, 5),
        held_out_code_acc=round(code_acc, 3),
        held_out_english_loss=round(eng_loss, 5),
        held_out_english_acc=round(eng_acc, 3),
    )
    models.save_recipe(size, recipe, directory)
    progress.say(
        f"pre-training --size {size}: {result.steps} steps ({result.stopped_by}) in "
        f"{seconds:.0f} s, best at step {result.best_step}; held-out code loss "
        f"{code_loss:.4f} (float16), English {eng_loss:.4f}; wrote "
        f"{models.checkpoint_paths(size, directory)[0]}"
    )
    return recipe
