"""Public methods given a tensor the optimizer does not hold, and optimizer state that was
corrupted (by hand, or by a bad checkpoint edit): answered as AdamW answers, or refused with a
ValueError that says what is wrong before anything changes."""

from __future__ import annotations

import warnings

import pytest
import torch

from maskopt import HalfAdam, MoFO, RandomBCD

MAKERS = {
    "mofo": lambda ps: MoFO(ps, lr=1e-2, alpha=0.3),
    "random_bcd": lambda ps: RandomBCD(ps, lr=1e-2, alpha=0.3, exact=True),
    "half_adam": lambda ps: HalfAdam(ps, lr=1e-2, ratio=1.0),
}


def _stepped(name):
    params = [
        torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
        for i, s in enumerate([(10,), (3, 4)])
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HalfAdam without names
        opt = MAKERS[name](params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(9))
    return params, opt


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()
    }


@pytest.mark.parametrize("name", list(MAKERS))
def test_methods_given_a_tensor_they_do_not_hold_say_so(name):
    _, opt = _stepped(name)
    foreign = torch.nn.Parameter(torch.zeros(7))
    methods = [opt.tensor_index, opt.selection_policy] + ([opt.is_trainable] if name == "half_adam" else [])
    for method in methods:
        with pytest.raises(ValueError, match=rf"{method.__name__}: a tensor of shape \(7,\) is not one of"):
            method(foreign)


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize(
    "key, bad",
    [
        ("step", torch.tensor(float("nan"))),
        ("step", torch.tensor(-3.0)),
        ("step", torch.tensor([1.0, 2.0])),
        ("step", "3"),
        ("exp_avg", torch.zeros(10, device="meta")),
        ("exp_avg_sq", torch.zeros(11)),
        ("exp_avg_sq", torch.zeros(10, dtype=torch.int64)),
    ],
    ids=[
        "step nan",
        "step negative",
        "step two elements",
        "step a string",
        "exp_avg on meta",
        "exp_avg_sq shape",
        "exp_avg_sq int",
    ],
)
def test_corrupted_state_is_refused_before_any_change(name, key, bad):
    params, opt = _stepped(name)
    opt.state[params[0]][key] = bad
    before = _snapshot(params, opt)
    with pytest.raises((ValueError, RuntimeError), match=rf"state\['{key}'\]|optimizer state"):
        opt.step()
    after = _snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    for pid, state in before[1].items():
        for k, v in state.items():
            assert _same(v, after[1][pid][k]), k


def _same(a, b) -> bool:
    if not torch.is_tensor(a):
        return a == b
    if a.device.type == "meta":  # no values to compare
        return b.device.type == "meta" and a.shape == b.shape
    return (
        a.dtype == b.dtype
        and torch.equal(a.isnan(), b.isnan())
        and torch.equal(a.nan_to_num(), b.nan_to_num())
    )


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_huge_step_counter_or_float64_moments_step_as_adamw_would(name):
    params, opt = _stepped(name)
    opt.state[params[0]]["step"] = torch.tensor(1e30)
    opt.state[params[1]]["exp_avg"] = opt.state[params[1]]["exp_avg"].double()
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32  # converted to the moment dtype


@pytest.mark.parametrize("name", list(MAKERS))
def test_meta_parameters_step_where_no_value_is_read_and_are_refused_where_one_is(name):
    p = torch.nn.Parameter(torch.zeros(10, device="meta"))
    q = torch.nn.Parameter(torch.zeros(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MAKERS[name]([q, p])
    q.grad, p.grad = torch.ones(4), torch.zeros(10, device="meta")
    if name == "half_adam":  # ratio 1: AdamW's step, which runs on meta tensors
        opt.step()
        assert opt.state[p]["exp_avg"].device.type == "meta"
        return
    with pytest.raises(ValueError, match="parameter 1 is on the meta device"):
        opt.step()
    assert not opt.state and torch.equal(q.detach(), torch.zeros(4))
