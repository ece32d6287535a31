"""maskopt inside Lightning (``lightning`` package): automatic optimization (Lightning calls
``optimizer.step(closure)``), manual optimization, a scheduler dict, HalfAdam on a tiny Llama,
and Lightning's checkpoint save + ``fit(ckpt_path=...)`` resume. CPU, a few steps each."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

from _helpers import snapshot, stable_topk_mask

from maskopt import HalfAdam, MoFO, RandomBCD, topk_count

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # "does not have many workers" / "small number of batches": irrelevant for a 2-core CPU test
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*number of training batches.*")
        # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; not ours
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        yield


def regression_loader(n=32, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def trainer(max_steps, **kw):
    base = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**(base | kw))


class Regressor(L.LightningModule):
    def __init__(self, make_optimizer):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.make_optimizer = make_optimizer
        self.step_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.step_losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        return self.make_optimizer(self)


class RecordingMoFO(MoFO):
    """MoFO that records how it was stepped (closure given? what came back?)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def step(self, closure=None):
        loss = super().step(closure)
        self.calls.append((closure is not None, loss))
        return loss


# ---------------------------------------------------------------------------------- automatic optimization


def test_lightning_automatic_mofo_runs_closure_and_moves_topk():
    alpha = 0.1
    module = Regressor(lambda m: RecordingMoFO(m.parameters(), lr=1e-2, alpha=alpha))
    before = snapshot(module)
    t = trainer(max_steps=1)
    t.fit(module, regression_loader())

    opt = t.optimizers[0]
    assert type(opt) is RecordingMoFO
    assert len(module.step_losses) == 1  # training_step ran once, inside the closure
    assert len(opt.calls) == 1
    given, returned = opt.calls[0]
    assert given, "Lightning must pass a closure to optimizer.step"
    assert torch.is_tensor(returned) and torch.equal(returned.detach(), module.step_losses[0])
    for name, p in module.named_parameters():
        m = opt.state[p]["exp_avg"]
        assert float(opt.state[p]["step"]) == 1.0, name
        moved = p.detach() != before[name]
        k = topk_count(p.numel(), alpha)
        assert torch.equal(moved, stable_topk_mask(m.abs(), k) & (m != 0)), name
        assert int(moved.sum()) == k, name  # dense MLP: every entry has a gradient


class CountMovedPerStep(L.Callback):
    """Counts, for every optimizer step, how many entries of each tensor changed."""

    def __init__(self):
        self.counts = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._before = snapshot(pl_module)  # after backward, before the update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append(
            {n: int((p.detach() != self._before[n]).sum()) for n, p in pl_module.named_parameters()}
        )


def test_lightning_random_bcd_with_scheduler_dict():
    alpha, steps = 0.25, 12

    def make(m):
        opt = RandomBCD(m.parameters(), lr=3e-2, alpha=alpha, seed=7, exact=True)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = Regressor(make)
    counter = CountMovedPerStep()
    t = trainer(max_steps=steps, callbacks=[counter])
    t.fit(module, regression_loader())

    opt = t.optimizers[0]
    assert type(opt) is RandomBCD
    assert len(counter.counts) == steps
    for counts in counter.counts:  # exact=True: exactly k entries of every tensor move per step
        for name, p in module.named_parameters():
            assert counts[name] == topk_count(p.numel(), alpha), name
    assert all(float(s["step"]) == steps for s in opt.state.values())
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-2 * 0.5 ** (steps // 4))  # the scheduler stepped
    losses = torch.stack(module.step_losses)
    assert torch.isfinite(losses).all()
    assert losses[-4:].mean() < 0.8 * losses[:4].mean()


def test_lightning_halfadam_on_tiny_llama():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = transformers.AutoModelForCausalLM.from_config(
                transformers.LlamaConfig(
                    vocab_size=64,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=4,
                )
            )
            self.losses = []

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            loss = self.model(input_ids=ids, labels=ids).loss
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            # named_parameters() of the LightningModule: names start with "model.", which the
            # HFT planner handles (the layer stack is model.model.layers)
            self.opt = HalfAdam(self.named_parameters(), lr=1e-2, seed=0)
            return self.opt

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (8, 16), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    module = LM()
    before = snapshot(module)
    t = trainer(max_steps=4)
    t.fit(module, loader)

    frozen = set(module.opt.plan.frozen)
    assert frozen and any(".layers." in n for n in frozen)
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), before[name]) == (name in frozen), name
    assert all(math.isfinite(x) for x in module.losses) and module.losses[-1] < module.losses[0]


# ---------------------------------------------------------------------------------- manual optimization


class ManualRegressor(Regressor):
    def __init__(self, make_optimizer):
        super().__init__(make_optimizer)
        self.automatic_optimization = False
        self.closure_calls = 0
        self.moved = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch

        def closure():
            self.closure_calls += 1
            loss = nn.functional.mse_loss(self.net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            return loss

        before = snapshot(self)
        loss = opt.step(closure=closure)
        self.moved.append({n: int((p.detach() != before[n]).sum()) for n, p in self.named_parameters()})
        self.step_losses.append(loss.detach())
        return loss


def test_lightning_manual_optimization_mofo_closure():
    alpha, steps = 0.2, 6
    module = ManualRegressor(lambda m: MoFO(m.parameters(), lr=3e-2, alpha=alpha))
    t = trainer(max_steps=steps)
    t.fit(module, regression_loader())

    opt = t.optimizers[0]
    assert type(opt) is MoFO
    assert module.closure_calls == steps and t.global_step == steps
    assert all(float(s["step"]) == steps for s in opt.state.values())
    assert all(torch.is_tensor(x) and torch.isfinite(x) for x in module.step_losses)
    for moved in module.moved:
        for name, p in module.named_parameters():
            assert moved[name] == topk_count(p.numel(), alpha), name
    losses = torch.stack(module.step_losses)
    assert losses[-2:].mean() < losses[:2].mean()


# ---------------------------------------------------------------------------------- checkpoint + resume


def _mofo_module():
    def make(m):
        opt = MoFO(m.parameters(), lr=2e-2, alpha=0.15, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Regressor(make)


def test_lightning_checkpoint_resume_restores_mofo_state(tmp_path):
    # Lightning's ModelCheckpoint writes the checkpoint during the uninterrupted run. The cut is
    # at an epoch end (4 batches per epoch): resuming mid-epoch restarts a plain DataLoader from
    # its first batch (Lightning warns), which changes the data order for AdamW just the same.
    total, cut = 7, 4
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=cut, save_top_k=-1)
    full = _mofo_module()
    trainer(max_steps=total, enable_checkpointing=True, callbacks=[saver]).fit(full, regression_loader())
    (ckpt,) = tmp_path.glob(f"*step={cut}.ckpt")

    raw = torch.load(ckpt, weights_only=True)  # Lightning's checkpoint holds the MoFO state dict
    (opt_sd,) = raw["optimizer_states"]
    assert all(float(s["step"]) == cut for s in opt_sd["state"].values())
    assert all(g["alpha"] == 0.15 for g in opt_sd["param_groups"])

    resumed = _mofo_module()
    with torch.no_grad():  # a different starting point: the weights must come from the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    t2 = trainer(max_steps=total)
    warnings.filterwarnings("ignore", message=r".*callbacks used to create the checkpoint.*")
    t2.fit(resumed, regression_loader(), ckpt_path=str(ckpt))

    opt = t2.optimizers[0]
    assert type(opt) is MoFO
    assert len(resumed.step_losses) == total - cut
    assert all(float(s["step"]) == total for s in opt.state.values())  # continued from `cut`
    full_params = dict(full.named_parameters())
    for name, p in resumed.named_parameters():
        torch.testing.assert_close(p.detach(), full_params[name].detach(), rtol=0, atol=1e-6, msg=name)
    full_opt = full.trainer.optimizers[0]
    for p_full, p_res in zip(full.parameters(), resumed.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p_res][key], full_opt.state[p_full][key], rtol=0, atol=1e-6)
