"""maskopt with Hugging Face ``accelerate`` on CPU: ``prepare`` + ``accumulate`` (gradient
accumulation) and ``save_state`` / ``load_state``. Compared against a plain PyTorch loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")

from _helpers import reset_accelerate_state

from maskopt import MoFO, topk_count

ACCUM = 2
MICRO_BATCHES = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def make_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * MICRO_BATCHES, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)


def make_mofo(model):
    return MoFO(model.parameters(), lr=2e-2, alpha=0.2, weight_decay=0.01)


def accelerate_loop(accelerator, model, opt, loader, epochs=1):
    losses, outer_steps = [], 0
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
                outer_steps += 1
            losses.append(float(loss.detach()))
    return losses, outer_steps


def manual_accumulation_loop(model, opt, loader, epochs=1):
    """The same training without accelerate: average ACCUM micro-batch gradients, then step."""
    batches = [b for _ in range(epochs) for b in loader]
    for i in range(0, len(batches), ACCUM):
        opt.zero_grad()
        for x, y in batches[i : i + ACCUM]:
            (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
        opt.step()


def test_accelerate_accumulate_matches_manual_accumulation():
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model = make_model()
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, opt, loader = accelerator.prepare(model, make_mofo(model), make_loader())
    losses, calls = accelerate_loop(accelerator, model, opt, loader)

    inner = opt.optimizer  # AcceleratedOptimizer around our MoFO
    assert type(inner) is MoFO
    assert calls == MICRO_BATCHES
    # the real optimizer stepped once per ACCUM micro-batches
    assert all(float(s["step"]) == MICRO_BATCHES // ACCUM for s in inner.state.values())
    assert len(inner.state) == len(list(model.parameters()))

    ref_opt = make_mofo(reference)
    manual_accumulation_loop(reference, ref_opt, make_loader())
    ref_params = dict(reference.named_parameters())
    for name, p in accelerator.unwrap_model(model).named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name].detach(), rtol=0, atol=1e-6, msg=name)
        ref_state = ref_opt.state[ref_params[name]]
        torch.testing.assert_close(inner.state[p]["exp_avg"], ref_state["exp_avg"], rtol=0, atol=1e-7)
        # sparse: at most (steps * k) entries of each tensor ever moved
        moved = int((p.detach() != before[name]).sum())
        assert 0 < moved <= (MICRO_BATCHES // ACCUM) * topk_count(p.numel(), 0.2), name
    assert len(losses) == MICRO_BATCHES and all(math.isfinite(x) for x in losses)


def test_accelerate_save_state_load_state_round_trip(tmp_path):
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model = make_model()
    model, opt, loader = accelerator.prepare(model, make_mofo(model), make_loader())
    accelerate_loop(accelerator, model, opt, loader)
    accelerator.save_state(str(tmp_path / "state"))
    saved = opt.optimizer.state_dict()

    optimizer_files = list((tmp_path / "state").glob("optimizer*.bin"))
    assert len(optimizer_files) == 1
    on_disk = torch.load(optimizer_files[0], weights_only=True)
    assert all(float(s["step"]) == MICRO_BATCHES // ACCUM for s in on_disk["state"].values())

    # as a new process would: fresh accelerate state, different weights, then load_state
    reset_accelerate_state()
    accelerator2 = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model2 = make_model()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(0.5)
    model2, opt2, loader2 = accelerator2.prepare(model2, make_mofo(model2), make_loader())
    accelerator2.load_state(str(tmp_path / "state"))

    loaded = opt2.optimizer.state_dict()
    assert type(opt2.optimizer) is MoFO
    assert loaded["param_groups"] == saved["param_groups"]
    assert loaded["state"].keys() == saved["state"].keys()
    for i, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded["state"][i][key], value), (i, key)
            assert loaded["state"][i][key].dtype == torch.float32
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)

    # one more epoch on both: identical trajectories, so the loaded state is the live one
    accelerate_loop(accelerator, model, opt, loader)
    accelerate_loop(accelerator2, model2, opt2, loader2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert all(float(s["step"]) == 2 * MICRO_BATCHES // ACCUM for s in opt2.optimizer.state.values())
