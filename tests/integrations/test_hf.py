"""maskopt inside the Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` (CPU, tiny random Llama).

What a user does: ``optimizer_cls_and_kwargs=(MoFO, {...})`` or ``optimizers=(opt, None)``,
``freeze_half`` + the Trainer's own AdamW, and checkpoint/resume through the Trainer.
Nothing is downloaded: the model is random-init and the SFT tokenizer is built here.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _helpers import snapshot, stable_topk_mask
from _tiny_models import TokenData, tiny_llama

from maskopt import HalfAdam, MoFO, RandomBCD, topk_count
from maskopt.hft import freeze_half

transformers.logging.set_verbosity_error()

VOCAB = 64
SEQ = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


def llama(seed=0, vocab=VOCAB):
    """With the pad and bos/eos ids that ``token_data`` leaves out of the sequences."""
    return tiny_llama(2, seed=seed, vocab=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=1)


def token_data(n=8):
    return TokenData(n, vocab=VOCAB, seq=SEQ, low=2)  # 0 and 1 are the pad and bos/eos ids


def trainer_args(out, **kw):
    base = {
        "output_dir": str(out),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    return transformers.TrainingArguments(**(base | kw))


def unwrap(opt):
    """The Trainer wraps the optimizer in accelerate's AcceleratedOptimizer."""
    return getattr(opt, "optimizer", opt)


# RandomBCD's hash, re-implemented here from the contract in maskopt/_hash.py's docstring.
def _mix32(x):
    x = np.asarray(x, dtype=np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def random_bcd_mask(shape, seed, tensor_index, step, alpha):
    s = seed & 0xFFFFFFFFFFFFFFFF
    key = int(_mix32((s ^ (s >> 32)) & 0xFFFFFFFF ^ 0x243F6A88))
    key = int(_mix32(key ^ tensor_index ^ 0x85A308D3))
    key = int(_mix32(key ^ step ^ 0x13198A2E))
    n = math.prod(shape)
    i = np.arange(n, dtype=np.uint64)
    u = _mix32((i * 0x9E3779B9 + key) & 0xFFFFFFFF)  # hi32(i) = 0 -> mix32(0) = 0
    return torch.from_numpy(u < round(alpha * 2**32)).view(shape)


# ---------------------------------------------------------------------------------- 1a MoFO


def test_trainer_optimizer_cls_and_kwargs_mofo_moves_exactly_topk(tmp_path):
    alpha = 0.1
    model = llama()
    before = snapshot(model)
    trainer = transformers.Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=1, learning_rate=5e-5),
        train_dataset=token_data(),
        optimizer_cls_and_kwargs=(MoFO, {"alpha": alpha, "lr": 1e-2}),
    )
    trainer.train()
    opt = unwrap(trainer.optimizer)
    assert type(opt) is MoFO
    # the kwargs' lr is the scheduler's base lr; TrainingArguments.learning_rate is not used
    assert all(g["initial_lr"] == 1e-2 and g["alpha"] == alpha for g in opt.param_groups)

    checked = 0
    for name, p in model.named_parameters():
        state = opt.state[p]
        assert float(state["step"]) == 1.0, name
        moved = p.detach() != before[name]
        k = topk_count(p.numel(), alpha)
        selected = stable_topk_mask(state["exp_avg"].abs(), k)
        # outside the top-k of |m| nothing moves; inside, every entry with a momentum does
        assert not (moved & ~selected).any(), name
        assert torch.equal(moved, selected & (state["exp_avg"] != 0)), name
        if int((state["exp_avg"] != 0).sum()) >= k:
            assert int(moved.sum()) == k, name
            checked += 1
    assert checked == len(list(model.parameters()))  # every tensor had >= k nonzero momenta


# ---------------------------------------------------------------------------------- 1b RandomBCD / HalfAdam


def test_trainer_optimizers_tuple_random_bcd_moves_only_its_mask(tmp_path):
    alpha, seed = 0.25, 3
    model = llama()
    before = snapshot(model)
    opt = RandomBCD(model.parameters(), lr=1e-2, alpha=alpha, seed=seed)
    trainer = transformers.Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=1),
        train_dataset=token_data(),
        optimizers=(opt, None),
    )
    trainer.train()
    assert unwrap(trainer.optimizer) is opt
    moved_total = selected_total = 0
    for index, (name, p) in enumerate(model.named_parameters()):
        moved = p.detach() != before[name]
        mask = random_bcd_mask(p.shape, seed, index, 1, alpha)
        assert not (moved & ~mask).any(), name
        assert torch.equal(moved, mask & (opt.state[p]["exp_avg"] != 0)), name
        moved_total += int(moved.sum())
        selected_total += int(mask.sum())
    n = sum(p.numel() for p in model.parameters())
    assert abs(selected_total / n - alpha) < 0.02
    assert moved_total > 0.5 * selected_total


def test_trainer_optimizers_tuple_halfadam_and_its_checkpoint(tmp_path):
    model = llama()
    before = snapshot(model)
    opt = HalfAdam(model.named_parameters(), lr=1e-2, seed=1)
    frozen = set(opt.plan.frozen)
    assert frozen and opt.plan.trainable
    trainer = transformers.Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=token_data(),
        optimizers=(opt, None),
    )
    trainer.train()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]) == (name in frozen), name
    sd = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    names = [n for n, _ in model.named_parameters()]
    with_state = {names[i] for i in sd["state"]}
    assert with_state == set(names) - frozen  # frozen tensors hold no optimizer state
    fresh = llama()
    reloaded = HalfAdam(fresh.named_parameters(), lr=1e-2, seed=1)
    reloaded.load_state_dict(sd)
    assert set(reloaded.plan.frozen) == frozen  # the same half after a reload


# ---------------------------------------------------------------------------------- 1c freeze_half + AdamW


def test_trainer_freeze_half_with_stock_adamw(tmp_path):
    model = llama()
    before = snapshot(model)
    plan = freeze_half(model, ratio=0.5, seed=0)
    trainer = transformers.Trainer(
        model=model, args=trainer_args(tmp_path, max_steps=2, weight_decay=0.1), train_dataset=token_data()
    )
    trainer.train()
    assert isinstance(unwrap(trainer.optimizer), torch.optim.AdamW)
    assert plan.frozen
    for name, p in model.named_parameters():
        if name in plan.frozen:
            assert torch.equal(p.detach(), before[name]), name
        else:
            assert (p.detach() != before[name]).float().mean() > 0.5, name


# ---------------------------------------------------------------------------------- 1d save / resume


def _mofo_trainer(out, model, max_steps):
    # weight decay must come from TrainingArguments: the Trainer's param groups set it per group,
    # overriding a weight_decay in the optimizer kwargs
    args = trainer_args(
        out, max_steps=max_steps, save_strategy="steps", save_steps=2, warmup_steps=1, weight_decay=0.01
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=token_data(n=6),
        optimizer_cls_and_kwargs=(MoFO, {"alpha": 0.2, "lr": 1e-2}),
    )


def test_trainer_mofo_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    steps = 6  # 2 epochs of 3 batches: the resume also crosses an epoch boundary
    full_model = llama(seed=0)
    full = _mofo_trainer(tmp_path / "full", full_model, steps)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"

    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sd["state"] and all(float(s["step"]) == 2.0 for s in sd["state"].values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in sd["state"].values())
    assert all(g["alpha"] == 0.2 for g in sd["param_groups"])
    assert sorted(g["weight_decay"] for g in sd["param_groups"]) == [0.0, 0.01]

    # a different init: the weights must come from the checkpoint
    resumed_model = llama(seed=123)
    resumed = _mofo_trainer(tmp_path / "resumed", resumed_model, steps)
    resumed.train(resume_from_checkpoint=str(ckpt))

    opt = unwrap(resumed.optimizer)
    assert type(opt) is MoFO
    # the step counter continued from the checkpoint's 2, so the optimizer state was loaded
    assert all(float(s["step"]) == steps for s in opt.state.values())
    full_params = dict(full_model.named_parameters())
    for name, p in resumed_model.named_parameters():
        torch.testing.assert_close(p.detach(), full_params[name].detach(), rtol=0, atol=1e-6, msg=name)
    full_sd, res_sd = unwrap(full.optimizer).state_dict(), opt.state_dict()
    for i, state in full_sd["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(res_sd["state"][i][key], state[key], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- 1e TRL SFTTrainer


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyz "
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_trl_sft_trainer_with_mofo(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    alpha, steps = 0.1, 8
    tok = char_tokenizer()
    model = llama(vocab=32)
    before = snapshot(model)
    texts = ["hello world", "the quick brown fox", "jumps over the lazy dog", "maskopt forgets less"]
    data = datasets.Dataset.from_dict({"text": texts})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # trl sets a deprecated TrainingArguments alias
        args = trl.SFTConfig(
            output_dir=str(tmp_path),
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            max_length=32,
            seed=0,
        )  # trl's default bf16=True: CPU bf16 autocast here
    assert args.bf16
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        optimizer_cls_and_kwargs=(MoFO, {"alpha": alpha, "lr": 1e-2}),
    )
    trainer.train()

    opt = unwrap(trainer.optimizer)
    assert type(opt) is MoFO
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05  # the same 4 texts every step: it learns them
    for name, p in model.named_parameters():
        assert float(opt.state[p]["step"]) == steps, name
        moved = int((p.detach() != before[name]).sum())
        assert 0 < moved <= steps * topk_count(p.numel(), alpha), name
