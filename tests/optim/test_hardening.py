"""What a hostile user tries: NaN gradients, values refused mid-run, foreign state dicts,
copies of HalfAdam, tensors frozen by hand, resumes built differently."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from _tiny_models import toy_llama, train_toy

from maskopt import HalfAdam, MoFO, RandomBCD, topk_count
from maskopt.reference import select

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- NaN -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("filter", ["momentum", "gradient"])
@pytest.mark.parametrize("foreach", [None, False])
def test_nan_gradients_still_move_exactly_k(filter, foreach):  # noqa: A002 - MoFO's keyword
    p = torch.nn.Parameter(torch.zeros(16))
    opt = MoFO([p], lr=0.1, alpha=0.25, filter=filter, foreach=foreach)
    g = torch.randn(16, generator=torch.Generator().manual_seed(0))
    g[:8] = float("nan")
    p.grad = g
    opt.step()
    moved = (p.detach() != 0) | p.detach().isnan()
    assert int(moved.sum()) == 4
    assert bool(p.detach()[:4].isnan().all())  # NaN ranks largest; ties go to the lowest index


def test_nan_selection_matches_the_reference_and_long_rows():
    """A row long enough for the sampled bracket (>= 2**16 entries) and a short one."""
    for n in (1000, 70_000):
        gen = torch.Generator().manual_seed(n)
        m = torch.randn(n, generator=gen)
        m[torch.randperm(n, generator=gen)[: n // 50]] = float("nan")
        m[3] = float("inf")
        p = torch.nn.Parameter(torch.zeros(n))
        opt = MoFO([p], lr=0.1, alpha=0.05)
        p.grad = m.clone()
        opt.step()
        expected = select("topk_momentum", opt.state[p]["exp_avg"].double(), m.double(), alpha=0.05).view(-1)
        moved = (p.detach() != 0) | p.detach().isnan()
        assert torch.equal(moved, expected)
        assert int(moved.sum()) == topk_count(n, 0.05)


def test_topk_masks_ranks_nan_largest_and_signed_zero_ties():
    from maskopt import topk_masks

    scores = torch.tensor([float("nan"), 1.0, 1.0, -0.0, 0.0, -5.0, -float("nan")])
    (mask,) = topk_masks([scores], 3 / 7)
    assert mask.tolist() == [True, True, False, False, False, False, True]
    (mask,) = topk_masks([torch.tensor([-0.0, 0.0, -1.0])], 0.34)  # -0.0 == 0.0: lowest index wins
    assert mask.tolist() == [True, False, False]


# -- refusals ------------------------------------------------------------------------------------


def test_string_hyperparameters_are_refused_at_construction():
    p = torch.nn.Parameter(torch.zeros(4))
    for key in ("eps", "weight_decay", "lr"):
        with pytest.raises(ValueError, match=key):
            MoFO([p], **{key: "1e-8"})


def test_group_value_changed_later_is_refused_before_counters_move():
    p = torch.nn.Parameter(torch.zeros(8))
    opt = MoFO([p], lr=0.1, alpha=0.5)
    p.grad = torch.ones(8)
    opt.step()
    state = copy.deepcopy(opt.state[p])
    for key, value in (("alpha", 0.0), ("filter", "bogus")):
        opt.param_groups[0][key] = value
        with pytest.raises(ValueError, match=f"Invalid {key}"):
            opt.step()
        assert float(opt.state[p]["step"]) == float(state["step"])
        assert torch.equal(opt.state[p]["exp_avg"], state["exp_avg"])
        opt.param_groups[0][key] = {"alpha": 0.5, "filter": "momentum"}[key]


def test_failed_load_state_dict_leaves_the_optimizer_as_it_was():
    p = torch.nn.Parameter(torch.zeros(8))
    opt = MoFO([p], lr=0.1)
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.1
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    assert len(opt.state) == 0


def test_numpy_integer_block_size_and_seed_are_accepted():
    p = torch.nn.Parameter(torch.zeros(16))
    MoFO([p], block_size=np.int64(4)).step()
    RandomBCD([p], seed=np.int64(3)).step()
    with pytest.raises(ValueError, match="block_size"):
        MoFO([p], block_size=True)


# -- AdamW's keys ----------------------------------------------------------------------------------


def _adamw_state_dict(**kwargs):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6))
    opt = torch.optim.AdamW([p], lr=0.1, **kwargs)
    p.grad = torch.randn(6)
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("cls", [MoFO, RandomBCD])
def test_adamw_state_dict_with_amsgrad_is_refused(cls):
    p = torch.nn.Parameter(torch.zeros(6))
    opt = cls([p])
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(_adamw_state_dict(amsgrad=True))
    with pytest.raises(ValueError, match="amsgrad"):
        cls([{"params": [p], "amsgrad": True}])
    assert "amsgrad" not in opt.param_groups[0]


def test_adamw_state_dict_with_maximize_is_honoured():
    """alpha=1 MoFO resumed from a maximizing AdamW continues exactly as that AdamW."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    b.data.copy_(a.data)
    adamw = torch.optim.AdamW([a], lr=0.1, weight_decay=0.0, maximize=True)
    a.grad = torch.randn(6)
    adamw.step()
    b.data.copy_(a.data)
    mofo = MoFO([b], alpha=1.0)
    mofo.load_state_dict(adamw.state_dict())
    assert mofo.param_groups[0]["maximize"] is True
    g = torch.randn(6)
    a.grad, b.grad = g.clone(), g.clone()
    adamw.step()
    mofo.step()
    torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-7)


# -- HalfAdam ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 1.0])
@pytest.mark.parametrize("named", [True, False])
def test_half_adam_never_unfreezes_what_the_user_froze(ratio, named):
    model = toy_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    frozen_by_user = [model.model.embed_tokens.weight, model.model.layers[0].self_attn.q_proj.weight]
    before = [p.detach().clone() for p in frozen_by_user]
    params = model.named_parameters() if named else model.parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = HalfAdam(params, lr=0.1, ratio=ratio)
    for r in range(3):
        assert not any(p.requires_grad for p in frozen_by_user)
        assert not any(opt.is_trainable(p) for p in frozen_by_user)
        if named:
            assert not {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"} & (
                opt.plan.trainable | opt.plan.entry_masked
            )
        train_toy(model, opt, 1, start=r)
        opt.new_round()
    for p, p0 in zip(frozen_by_user, before, strict=True):
        assert torch.equal(p, p0)
        assert p not in opt.state


def test_half_adam_leaves_its_own_frozen_half_to_a_new_optimizer():
    """A second HalfAdam on the same model (a new stage) is not fooled by the first one's freezing."""
    model = toy_llama()
    first = HalfAdam(model.named_parameters(), seed=0)
    second = HalfAdam(model.named_parameters(), seed=0, round=1)
    assert second.plan.trainable == HalfAdam(toy_llama().named_parameters(), seed=0, round=1).plan.trainable
    del first


def test_mofo_state_loaded_into_half_adam_keeps_no_state_for_frozen_tensors():
    model = toy_llama()
    mofo = MoFO(model.parameters(), lr=0.01)
    train_toy(model, mofo, 1)
    twin = toy_llama()
    twin.load_state_dict(model.state_dict())
    half = HalfAdam(twin.named_parameters(), lr=0.01)
    half.load_state_dict(mofo.state_dict())
    frozen = [p for p in twin.parameters() if not half.is_trainable(p)]
    assert frozen and not any(p in half.state for p in frozen)
    assert all(p in half.state for p in twin.parameters() if half.is_trainable(p))


@pytest.mark.parametrize("saved_named", [True, False])
def test_half_adam_resume_with_a_different_selection_is_refused(saved_named):
    model = toy_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = HalfAdam(model.named_parameters() if saved_named else model.parameters(), lr=0.01)
        train_toy(model, opt, 1)
        twin, twin2 = toy_llama(), toy_llama()
        other = HalfAdam(twin.parameters() if saved_named else twin.named_parameters(), lr=0.01)
        same = HalfAdam(twin2.named_parameters() if saved_named else twin2.parameters(), lr=0.01)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in other.param_groups])
    with pytest.raises(ValueError, match="different set of tensors"):
        other.load_state_dict(opt.state_dict())
    assert [{k: v for k, v in g.items() if k != "params"} for g in other.param_groups] == groups_before
    same.load_state_dict(opt.state_dict())  # built the same way: loads


def test_half_adam_planner_options_are_checked_with_or_without_names():
    model = toy_llama()
    with pytest.raises(ValueError, match="Invalid layers"):
        HalfAdam(model.named_parameters(), layers=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="Invalid balance"):
            HalfAdam(model.parameters(), balance="foo")
        with pytest.raises(ValueError, match="Invalid freeze_non_layer"):
            HalfAdam(model.parameters(), freeze_non_layer="yes")


def test_half_adam_copy_steps_and_starts_new_rounds():
    model = toy_llama()
    opt = HalfAdam(model.named_parameters(), lr=0.01)
    train_toy(model, opt, 1)
    twin, twin_opt = copy.deepcopy((model, opt))
    twin_opt.new_round()
    opt.new_round()
    assert twin_opt.plan.trainable == opt.plan.trainable
    train_toy(model, opt, 1, start=1)
    train_toy(twin, twin_opt, 1, start=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
