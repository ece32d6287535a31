"""A stateful differential suite: random sequences of what a training loop does to an optimizer.

Hypothesis drives each optimizer through steps (random gradients, some missing, a rare NaN),
steps that GradScaler skips (``found_inf = 1``), ``zero_grad``, state-dict round trips through ``torch.save``/``torch.load(weights_only=True)``
into a fresh optimizer, ``deepcopy``, ``add_param_group``, lr and weight-decay edits (what a
scheduler does between steps), refused
bad values and, for HalfAdam, ``new_round()``. After every call:

- ``alpha = 1`` (MoFO, RandomBCD) and ``ratio = 1`` (HalfAdam): parameters and state equal
  ``torch.optim.AdamW`` driven by the same calls, bit for bit on the PyTorch path (the Triton
  path rounds each operation on its own: within a few ulp there);
- ``alpha < 1`` (MoFO, exact RandomBCD): the step moved exactly the entries
  :func:`maskopt.reference.select` picks from the optimizer's own new ``exp_avg`` (exactly k,
  ties to the lowest index), and every other entry kept its bits;
- HalfAdam with ``ratio < 1``: the trainable set stays the same within a round;
- a refused call changes nothing.

The PyTorch path runs with more examples; the Triton path (the interpreter on a CPU) with a
few. ``pytest -m slow`` runs many more.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from maskopt import HalfAdam, MoFO, RandomBCD, topk_count
from maskopt.reference import select

SHAPES = [(5,), (3, 4), (9,)]
LRS = (1e-3, 3e-2, 0.0)
DECAYS = (0.0, 0.01, 0.1)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality that takes NaN in the same places as equal."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _weights_only(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _snapshot(params, opt):
    return (
        [p.detach().clone() for p in params],
        {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
    )


def _same_snapshot(a, b) -> bool:
    (pa, sa, ga), (pb, sb, gb) = a, b
    return (
        all(_equal(x, y) for x, y in zip(pa, pb, strict=True))
        and sa.keys() == sb.keys()
        and all(_equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
        and ga == gb
    )


gradient_plans = st.lists(
    st.tuples(st.booleans(), st.integers(0, 2**16), st.integers(0, 40)), min_size=1, max_size=4
)


class _Loop(RuleBasedStateMachine):
    """What every machine shares: the parameters, the optimizer, the calls a loop makes."""

    fused: bool | None = False

    def make(self, params):
        raise NotImplementedError

    @property
    def device(self) -> str:
        return "cuda" if self.fused and torch.cuda.is_available() else "cpu"

    def _new_param(self, shape, seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.nn.Parameter(torch.randn(shape, generator=gen).to(self.device))

    @initialize(seed=st.integers(0, 2**16))
    def build(self, seed):
        self.params = [self._new_param(s, seed + i) for i, s in enumerate(SHAPES)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # HalfAdam without names
            self.opt = self.make(self.params)
        self.after_build()

    def after_build(self):
        pass

    def grads_for(self, plan):
        """Per parameter a gradient (or None), from (present, seed, nan-if-zero) triples."""
        out = []
        for i, p in enumerate(self.params):
            present, seed, nan = plan[i % len(plan)]
            if not present:
                out.append(None)
                continue
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i))
            if nan == 0:
                g.view(-1)[0] = float("nan")
            out.append(g.to(self.device))
        return out

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        self.opt.zero_grad(set_to_none=set_to_none)
        self.on_zero_grad(set_to_none)

    def on_zero_grad(self, set_to_none):
        pass

    @rule()
    def save_and_load_into_a_fresh_optimizer(self):
        saved = _weights_only(self.opt.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = self.make(self.params[: len(SHAPES)])  # built as the saving one was
            for p in self.params[len(SHAPES) :]:
                fresh.add_param_group({"params": [p]})
        fresh.load_state_dict(saved)
        self.opt = fresh

    @rule(lr=st.sampled_from(LRS), decay=st.sampled_from(DECAYS))
    def edit_hyperparameters(self, lr, decay):
        for group in self.groups_to_edit():
            group["lr"] = lr
            group["weight_decay"] = decay

    def groups_to_edit(self):
        return self.opt.param_groups

    @rule(plan=gradient_plans)
    def a_step_gradscaler_skips_changes_nothing(self, plan):
        """GradScaler found an inf: it hands the step found_inf = 1, and the step changes nothing."""
        for p, g in zip(self.params, self.grads_for(plan), strict=True):
            p.grad = g
        before = _snapshot(self.params, self.opt)
        self.opt.grad_scale = torch.ones((), device=self.device)
        self.opt.found_inf = torch.ones((), device=self.device)
        try:
            self.opt.step()
        finally:
            del self.opt.grad_scale, self.opt.found_inf
        (params_before, state_before, groups_before), (params_after, state_after, groups_after) = (
            before,
            _snapshot(self.params, self.opt),
        )
        assert all(_equal(a, b) for a, b in zip(params_before, params_after, strict=True))
        assert groups_before == groups_after
        for pid, state in state_after.items():
            if pid in state_before:  # what existed is untouched
                assert all(_equal(state_before[pid][k], v) for k, v in state.items())
            else:  # created as torch's fused AdamW creates it for a skipped step: zeros, step 0
                assert (
                    float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
                )
        self.on_zero_grad(True)
        for p in self.params:
            p.grad = None

    @rule(
        key=st.sampled_from(["lr", "eps", "weight_decay"]),
        value=st.sampled_from([-1.0, float("nan"), "1e-3"]),
    )
    def a_refused_value_changes_nothing(self, key, value):
        for p in self.params:
            if p.grad is None:
                p.grad = torch.ones_like(p)
        before = _snapshot(self.params, self.opt)
        good = self.opt.param_groups[0][key]
        self.opt.param_groups[0][key] = value
        with pytest.raises(ValueError, match=key):
            self.opt.step()
        self.opt.param_groups[0][key] = good
        assert _same_snapshot(before, _snapshot(self.params, self.opt))
        self.on_zero_grad(False)  # the ones put in are stepped by neither side later
        for p in self.params:
            p.grad = None


class AgainstAdamW(_Loop):
    """alpha = 1 / ratio = 1: the same bits as torch.optim.AdamW after every call."""

    def make(self, params):
        raise NotImplementedError

    def after_build(self):
        self.twins = [p.detach().cpu().clone().requires_grad_() for p in self.params]
        self.adamw = torch.optim.AdamW(self.twins, lr=1e-3, weight_decay=0.0)
        for group in self.opt.param_groups:
            group["lr"], group["weight_decay"] = 1e-3, 0.0

    @rule(plan=gradient_plans)
    def step(self, plan):
        for p, t, g in zip(self.params, self.twins, self.grads_for(plan), strict=True):
            p.grad = None if g is None else g.clone()
            t.grad = None if g is None else g.cpu()
        self.opt.step()
        self.adamw.step()

    def on_zero_grad(self, set_to_none):
        self.adamw.zero_grad(set_to_none=set_to_none)

    def groups_to_edit(self):
        return [*self.opt.param_groups, *self.adamw.param_groups]

    @rule(seed=st.integers(0, 2**16))
    def deepcopy(self, seed):
        self.params, self.opt = copy.deepcopy((self.params, self.opt))

    @precondition(lambda self: len(self.params) < 5)
    @rule(seed=st.integers(0, 2**16))
    def add_param_group(self, seed):
        p = self._new_param((6,), seed)
        t = p.detach().cpu().clone().requires_grad_()
        lr, decay = self.adamw.param_groups[0]["lr"], self.adamw.param_groups[0]["weight_decay"]
        self.params.append(p)
        self.twins.append(t)
        self.opt.add_param_group({"params": [p], "lr": lr, "weight_decay": decay})
        self.adamw.add_param_group({"params": [t], "lr": lr, "weight_decay": decay})

    @invariant()
    def same_bits_as_adamw(self):
        """The PyTorch path runs AdamW's own ops: the same bits. The kernels round each operation
        on its own (docs/kernels.md, "Rounding") where torch's CPU AdamW lerps and may fuse a
        multiply-add: there, within a few ulp of the operands (a moment that cancels to near zero
        keeps an absolute error of their size), NaN in the same places, the same step count."""
        if not hasattr(self, "twins"):
            return

        def same(a, b):
            if not self.fused:
                return _equal(a, b)
            return torch.equal(a.isnan(), b.isnan()) and torch.allclose(
                a, b, rtol=1e-6, atol=1e-7, equal_nan=True
            )

        for p, t in zip(self.params, self.twins, strict=True):
            assert same(p.detach(), t.detach().to(p.device))
            if t in self.adamw.state and self.adamw.state[t]:
                ours, theirs = self.opt.state[p], self.adamw.state[t]
                for key in ("exp_avg", "exp_avg_sq"):
                    assert same(ours[key], theirs[key].to(ours[key].device)), key
                assert float(ours["step"]) == float(theirs["step"])


class MoFOAsAdamW(AgainstAdamW):
    def make(self, params):
        return MoFO(params, lr=1e-3, alpha=1.0, fused=self.fused)


class RandomBCDAsAdamW(AgainstAdamW):
    def make(self, params):
        return RandomBCD(params, lr=1e-3, alpha=1.0, seed=3, fused=self.fused)


class HalfAdamAsAdamW(AgainstAdamW):
    def make(self, params):
        return HalfAdam(params, lr=1e-3, ratio=1.0, fused=self.fused)

    @rule()
    def new_round(self):
        self.opt.new_round()
        self.adamw.state.clear()


class AgainstTheReference(_Loop):
    """alpha < 1: each step moves exactly the entries the reference selects from the
    optimizer's own new moments, and no other entry changes."""

    selection = "topk_momentum"

    @rule(plan=gradient_plans)
    def step(self, plan):
        grads = self.grads_for(plan)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = None if g is None else g
        before = [p.detach().clone() for p in self.params]
        self.opt.step()
        group = self.opt.param_groups[0]
        for i, (p, old, g) in enumerate(zip(self.params, before, grads, strict=True)):
            if g is None:
                assert _equal(p.detach(), old)
                continue
            state = self.opt.state[p]
            expected = (
                select(
                    self.selection,
                    state["exp_avg"].cpu(),
                    g.cpu(),
                    alpha=group["alpha"],
                    seed=group.get("seed", 0),
                    tensor_index=i,
                    counter=int(state["step"]),
                )
                .view(p.shape)
                .to(p.device)
            )
            moved = ~((p.detach() == old) | (p.detach().isnan() & old.isnan()))
            # a selected entry may keep its value (an update that rounds away, lr = 0): moved
            # entries are selected ones, and with lr > 0 every selected one moved
            assert not bool((moved & ~expected).any()), "an unselected entry changed"
            assert int(expected.sum()) == topk_count(p.numel(), group["alpha"])
            if group["lr"] >= 1e-3:  # a NaN entry stays NaN whether it is selected or not
                known = ~(p.detach().isnan() | old.isnan())
                assert torch.equal(moved & known, expected & known), "a selected entry did not move"


class MoFOAgainstTheReference(AgainstTheReference):
    def make(self, params):
        return MoFO(params, lr=1e-2, alpha=0.3, fused=self.fused)


class ExactRandomBCDAgainstTheReference(AgainstTheReference):
    selection = "random_exact"

    def make(self, params):
        return RandomBCD(params, lr=1e-2, alpha=0.3, seed=7, exact=True, fused=self.fused)


class HalfAdamRounds(_Loop):
    """ratio < 1 with names: the trainable set is fixed within a round, whatever the loop does."""

    def make(self, params):
        names = [f"model.layers.{i}.mlp.weight" for i in range(len(params))]
        named = list(zip(names, params, strict=True))
        return HalfAdam(named, lr=1e-2, ratio=0.5, strategy="model", seed=1, fused=self.fused)

    def after_build(self):
        self.trainable = self._trainable()

    def _trainable(self):
        return [self.opt.is_trainable(p) for p in self.params]

    @rule(plan=gradient_plans)
    def step(self, plan):
        for p, g in zip(self.params, self.grads_for(plan), strict=True):
            p.grad = g
        self.opt.step()

    @rule()
    def new_round(self):
        self.opt.new_round()
        self.trainable = self._trainable()

    @invariant()
    def the_round_keeps_its_half(self):
        if hasattr(self, "trainable"):
            assert self._trainable() == self.trainable
            for p, on in zip(self.params, self.trainable, strict=True):
                if not on:
                    assert p not in self.opt.state or not self.opt.state[p]


MACHINES = [
    MoFOAsAdamW,
    RandomBCDAsAdamW,
    HalfAdamAsAdamW,
    MoFOAgainstTheReference,
    ExactRandomBCDAgainstTheReference,
    HalfAdamRounds,
]


def _run(machine, fused, examples, steps):
    cls = type(f"{machine.__name__}_{'triton' if fused else 'pytorch'}", (machine,), {"fused": fused})
    profile = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        derandomize=True,
        database=None,
        # the interpreter makes shrinking take minutes: report the sequence as found
        phases=[Phase.explicit, Phase.generate] if fused else list(Phase),
    )
    run_state_machine_as_test(cls, settings=profile)


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.__name__)
def test_pytorch_path(machine):
    _run(machine, False, examples=40, steps=15)


@pytest.fixture
def triton_path(monkeypatch):
    """The Triton path here: CUDA, or the interpreter on a CPU (set only while the test runs,
    like the kernel tests do, so no other module sees it)."""
    from maskopt.functional import fused_available

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        from maskopt.kernels import launch

        if not launch._kernels_interpreted():  # built without the interpreter in this process
            pytest.skip("maskopt.kernels were built for a GPU in this process")
    if not fused_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("the Triton path is not available here")


@pytest.mark.parametrize("machine", MACHINES[:4], ids=lambda m: m.__name__)
def test_triton_path(machine, triton_path):
    _run(machine, True, examples=3, steps=8)


@pytest.mark.slow
@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.__name__)
def test_many_sequences_pytorch_path(machine):
    _run(machine, False, examples=500, steps=30)


@pytest.mark.slow
@pytest.mark.parametrize("machine", MACHINES[:4], ids=lambda m: m.__name__)
def test_many_sequences_triton_path(machine, triton_path):
    _run(machine, True, examples=30, steps=15)
