"""HFT with the Hugging Face Trainer: freeze_half + the stock AdamW, and HalfAdam passed in.

Needs ``accelerate`` (a Trainer dependency); skipped without it."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import TokenData, tiny_llama

from maskopt.hft import freeze_half

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
transformers.logging.set_verbosity_error()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        **kw,
    )


def test_trainer_with_freeze_half_and_stock_adamw(tmp_path):
    model = tiny_llama(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = freeze_half(model, ratio=0.5, seed=0)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, weight_decay=0.1), train_dataset=TokenData(vocab=96)
    )
    trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().cpu(), before[n]) == (n in plan.frozen), n
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert opt_params == {id(params[n]) for n in plan.trainable}  # the stock AdamW never sees the frozen half


def test_trainer_with_halfadam(tmp_path):
    from maskopt import HalfAdam

    model = tiny_llama(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = HalfAdam(model.named_parameters(), lr=1e-2, seed=1)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path), train_dataset=TokenData(vocab=96), optimizers=(opt, None)
    )
    trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().cpu(), before[n]) == (n in opt.plan.frozen), n
