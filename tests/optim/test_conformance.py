"""Generic optimizer conformance: one table of optimizer configurations drives the same tests
(state dicts, copies, hooks, no-grad steps, per-group values, refusals), in the spirit of
PyTorch's OptimizerInfo suite."""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
from _tiny_models import token_ids, toy_llama, train_toy

from maskopt import HalfAdam, MoFO, RandomBCD

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _named(model):
    return list(model.named_parameters())


def _plain(model):
    return list(model.parameters())


# name -> (build(model, **overrides) -> optimizer, group keys that the configuration uses)
CONFIGS = {
    "mofo": (
        lambda m, **kw: MoFO(_plain(m), **{"lr": 0.01, "alpha": 0.2, "weight_decay": 0.1, **kw}),
        ("alpha",),
    ),
    "mofo_named_gradient_blocks": (
        lambda m, **kw: MoFO(
            _named(m), **{"lr": 0.01, "alpha": 0.3, "filter": "gradient", "block_size": 8, **kw}
        ),
        ("alpha", "filter", "block_size"),
    ),
    "mofo_alpha1": (lambda m, **kw: MoFO(_plain(m), **{"lr": 0.01, "alpha": 1.0, **kw}), ("alpha",)),
    "mofo_decay_all_single_tensor": (
        lambda m, **kw: MoFO(
            _plain(m),
            **{
                "lr": 0.01,
                "alpha": 0.1,
                "weight_decay": 0.1,
                "mask_weight_decay": False,
                "foreach": False,
                **kw,
            },
        ),
        ("alpha",),
    ),
    "random_bcd": (
        lambda m, **kw: RandomBCD(_plain(m), **{"lr": 0.01, "alpha": 0.3, "seed": 3, **kw}),
        ("alpha", "seed"),
    ),
    "random_bcd_exact": (
        lambda m, **kw: RandomBCD(_plain(m), **{"lr": 0.01, "alpha": 0.3, "exact": True, **kw}),
        ("alpha", "seed", "exact"),
    ),
    "half_adam": (
        lambda m, **kw: HalfAdam(_named(m), **{"lr": 0.01, "weight_decay": 0.1, **kw}),
        ("ratio", "strategy", "freeze", "round", "seed"),
    ),
    "half_adam_mask_parameter": (
        lambda m, **kw: HalfAdam(_named(m), **{"lr": 0.01, "strategy": "parameter", "freeze": "mask", **kw}),
        ("ratio", "strategy", "freeze", "round", "seed"),
    ),
}

# Values every optimizer must refuse for a key it uses (shared keys first).
BAD_VALUES = {
    "lr": [-1.0, "0.1", None, float("nan")],
    "betas": [(1.0, 0.9), (0.9,), "x"],
    "eps": ["1e-8", -1.0],
    "weight_decay": ["0.1", -0.5],
    "maximize": ["yes", 1],
    "foreach": ["no"],
    "fused": [2],
    "amsgrad": [True],
    "differentiable": [True],
    "alpha": [0.0, 1.5, "0.1"],
    "filter": ["bogus"],
    "block_size": [0, 2.5, "8"],
    "seed": [1.5, "a"],
    "exact": ["yes"],
    "ratio": [0.0, 2.0],
    "strategy": ["bogus"],
    "freeze": ["bogus"],
    "round": [-1, 0.5],
}
SHARED_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "maximize",
    "foreach",
    "fused",
    "amsgrad",
    "differentiable",
)


def _twin(model):
    """The same weights in a fresh model. (A deepcopy would also copy the requires_grad=False
    that a HalfAdam set, and a new HalfAdam takes a tensor frozen that way for one frozen by
    hand: a copied model loses the mark that tells them apart.)"""
    twin = toy_llama()
    twin.load_state_dict(model.state_dict())
    return twin


def _snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {
        id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for p, s in opt.state.items()
    }
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    return params, state, groups


def _assert_same_snapshot(a, b):
    params_a, state_a, groups_a = a
    params_b, state_b, groups_b = b
    for n in params_a:
        assert torch.equal(params_a[n], params_b[n]), n
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].keys() == state_b[key].keys()
        for k in state_a[key]:
            va, vb = state_a[key][k], state_b[key][k]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, k
    assert groups_a == groups_b


def _assert_equal_state_dicts(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid in a["state"]:
        assert a["state"][pid].keys() == b["state"][pid].keys()
        for k, v in a["state"][pid].items():
            w = b["state"][pid][k]
            assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w, (pid, k)


def _params_equal(m1, m2):
    return all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))


@pytest.fixture(params=list(CONFIGS))
def config(request):
    return request.param


def test_state_dict_deterministic(config):
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model)
    train_toy(model, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    twin = _twin(model)
    twin_opt = build(twin)
    twin_opt.load_state_dict(copy.deepcopy(saved))
    _assert_equal_state_dicts(twin_opt.state_dict(), saved)
    # and the loaded optimizer continues exactly as the original
    train_toy(model, opt, 2, start=3)
    train_toy(twin, twin_opt, 2, start=3)
    assert _params_equal(model, twin)
    _assert_equal_state_dicts(twin_opt.state_dict(), opt.state_dict())


def test_weights_only_round_trip(config):
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model)
    train_toy(model, opt, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    twin = _twin(model)
    twin_opt = build(twin)
    twin_opt.load_state_dict(loaded)
    _assert_equal_state_dicts(twin_opt.state_dict(), opt.state_dict())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_stepping_identically(config, how):
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model)
    train_toy(model, opt, 2)
    if how == "deepcopy":
        twin, twin_opt = copy.deepcopy((model, opt))
    else:
        twin, twin_opt = pickle.loads(pickle.dumps((model, opt)))
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(twin_opt) if not k.startswith("_")}
    train_toy(model, opt, 2, start=2)
    train_toy(twin, twin_opt, 2, start=2)
    assert _params_equal(model, twin)
    _assert_equal_state_dicts(twin_opt.state_dict(), opt.state_dict())
    if isinstance(opt, HalfAdam):
        opt.new_round()
        twin_opt.new_round()
        assert [opt.is_trainable(p) for p in model.parameters()] == [
            twin_opt.is_trainable(p) for p in twin.parameters()
        ]
        train_toy(model, opt, 1, start=4)
        train_toy(twin, twin_opt, 1, start=4)
        assert _params_equal(model, twin)


def test_step_without_gradients_changes_nothing(config):
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model)
    before = _snapshot(model, opt)
    opt.step()
    assert len(opt.state) == 0
    _assert_same_snapshot(before, _snapshot(model, opt))


def test_zero_gradient_first_step_moves_nothing(config):
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())
    assert len(opt.state) > 0


def test_per_group_lr_and_weight_decay(config):
    build, _ = CONFIGS[config]
    model = toy_llama()
    named = _named(model)
    half = len(named) // 2
    opt = build(model)
    defaults = {k: v for k, v in opt.defaults.items() if k != "differentiable"}
    groups = [
        {"params": named[:half] if "param_names" in opt.param_groups[0] else [p for _, p in named[:half]]},
        {
            "params": named[half:] if "param_names" in opt.param_groups[0] else [p for _, p in named[half:]],
            "lr": 0.0,
            "weight_decay": 0.0,
        },
    ]
    opt = type(opt)(
        groups, **{k: v for k, v in defaults.items() if k in type(opt).__init__.__code__.co_varnames}
    )
    frozen_group = {n: p.detach().clone() for n, p in named[half:]}
    train_toy(model, opt, 2)
    assert opt.param_groups[1]["lr"] == 0.0 and opt.param_groups[0]["lr"] == defaults["lr"]
    for n, p in named[half:]:
        assert torch.equal(p, frozen_group[n]), n
    assert any(
        not torch.equal(p, q) for (_, p), q in zip(named[:half], toy_llama().parameters(), strict=True)
    )


def test_hooks_and_repr(config):
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model)
    calls = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
        opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre")),
        opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post")),
    ]
    train_toy(model, opt, 1)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd_pre", "load_post"]
    for h in handles:
        h.remove()
    train_toy(model, opt, 1, start=1)
    assert len(calls) == 4
    text = repr(opt)
    assert type(opt).__name__ in text and "lr: 0.01" in text
    for key in CONFIGS[config][1]:
        assert f"{key}:" in text


def test_closure_returns_loss(config):
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model)
    ids = token_ids(0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.ndim == 0


def _bad_cases(config):
    keys = SHARED_KEYS + CONFIGS[config][1]
    return [(key, value) for key in keys for value in BAD_VALUES[key]]


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_bad_values_are_refused_before_anything_changes(config_name):
    build, _ = CONFIGS[config_name]
    accepted = inspect.signature(type(build(toy_llama()))).parameters
    for key, value in _bad_cases(config_name):
        if key in accepted:  # at construction
            with pytest.raises(ValueError, match=key.split("[")[0]):
                build(toy_llama(), **{key: value})
        # put into param_groups later (a scheduler, a user): step refuses with nothing changed
        model = toy_llama()
        opt = build(model)
        train_toy(model, opt, 1)
        good = opt.param_groups[-1].get(key, "<absent>")
        opt.param_groups[-1][key] = value
        ids = token_ids(5)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        before = _snapshot(model, opt)
        with pytest.raises(ValueError, match=key):
            opt.step()
        _assert_same_snapshot(before, _snapshot(model, opt))
        # in a state dict: refused, and the optimizer keeps its own values
        if good == "<absent>":
            del opt.param_groups[-1][key]
        else:
            opt.param_groups[-1][key] = good
        state_dict = copy.deepcopy(opt.state_dict())
        state_dict["param_groups"][-1][key] = value
        groups_before = copy.deepcopy(
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        )
        with pytest.raises(ValueError, match=key):
            opt.load_state_dict(state_dict)
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before


def test_add_param_group_refuses_bad_values_and_keeps_groups(config):
    build, keys = CONFIGS[config]
    model = toy_llama()
    params = list(model.parameters())
    opt = build(model)
    extra = torch.nn.Parameter(torch.zeros(3))
    for key in ("lr", keys[0]):
        with pytest.raises(ValueError, match=key):
            opt.add_param_group({"params": [extra], key: BAD_VALUES[key][0]})
        assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == len(params)


def test_wrong_shape_gradient_refused_before_anything_changes(config):
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model)
    train_toy(model, opt, 1)
    before = _snapshot(model, opt)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    victim = [
        p
        for p in model.parameters()
        if p.requires_grad and (not isinstance(opt, HalfAdam) or opt.is_trainable(p))
    ][-1]
    victim.grad.data = torch.ones(victim.numel() + 1)  # torch refuses `p.grad = wrong shape`
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    _assert_same_snapshot(before, _snapshot(model, opt))


def test_maximize_is_descent_on_the_negated_gradient(config):
    build, _ = CONFIGS[config]
    up, down = toy_llama(), toy_llama()
    opt_up, opt_down = build(up, maximize=True), build(down)
    for s in range(3):
        ids = token_ids(s)
        for model, opt, sign in ((up, opt_up, -1.0), (down, opt_down, 1.0)):
            loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
            opt.zero_grad()
            (sign * loss).backward()
            opt.step()
    assert _params_equal(up, down)
    assert opt_up.state_dict()["param_groups"][0]["maximize"] is True


def test_load_state_dict_does_not_add_keys(config):
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model)
    train_toy(model, opt, 1)
    keys = [set(g) for g in opt.state_dict()["param_groups"]]
    opt.load_state_dict(opt.state_dict())
    assert [set(g) for g in opt.state_dict()["param_groups"]] == keys
    assert "differentiable" not in opt.param_groups[0]


# -- where torch.optim.AdamW is the yardstick: load hooks and its keywords, for every configuration


def test_load_pre_hooks_run_first_and_post_hooks_last_as_with_adamw(config):
    """A pre-hook's adapted dict is what gets checked and installed (moments included); a
    post-hook sees the loaded state and may replace it."""
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model)
    train_toy(model, opt, 2)
    saved = opt.state_dict()
    saved["param_groups"][0]["amsgrad"] = True  # refused unless a pre-hook adapts it
    fresh = build(_twin(model))

    def adapt(optimizer, state_dict):
        groups = [{k: v for k, v in g.items() if k != "amsgrad"} for g in state_dict["param_groups"]]
        state = {pid: {**s, "exp_avg": s["exp_avg"] * 2} for pid, s in state_dict["state"].items()}
        return {"param_groups": groups, "state": state}

    seen = []
    fresh.register_load_state_dict_pre_hook(adapt)
    fresh.register_load_state_dict_post_hook(lambda optimizer: seen.append(dict(optimizer.state)))
    fresh.load_state_dict(saved)
    assert seen and len(seen[0]) == len(opt.state)
    for p, q in zip(opt.param_groups[0]["params"], fresh.param_groups[0]["params"], strict=True):
        if p in opt.state:
            assert torch.equal(fresh.state[q]["exp_avg"], opt.state[p]["exp_avg"] * 2)


def test_adamws_keywords_are_accepted_unless_they_ask_what_maskopt_cannot_do(config):
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model, amsgrad=False, capturable=False, differentiable=False)
    train_toy(model, opt, 1)
    build(toy_llama(), capturable=True)
    for key in ("amsgrad", "differentiable"):
        with pytest.raises(ValueError, match=key):
            build(toy_llama(), **{key: True})


def test_a_cpu_fused_adamw_checkpoint_loads_and_the_optimizer_keeps_its_own_path(config):
    """``fused`` and ``foreach`` say how this process steps: not taken from a checkpoint."""
    build, _ = CONFIGS[config]
    model = toy_llama()
    adamw = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    train_toy(model, adamw, 2)
    twin = _twin(model)
    opt = build(twin)
    own = [(g.get("fused"), g.get("foreach")) for g in opt.param_groups]
    opt.load_state_dict(adamw.state_dict())
    assert [(g.get("fused"), g.get("foreach")) for g in opt.param_groups] == own
    train_toy(twin, opt, 1, start=2)


def test_numpy_values_set_in_param_groups_keep_the_checkpoint_weights_only(config):
    import numpy as np

    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model)
    train_toy(model, opt, 1)
    opt.param_groups[0]["lr"] = np.float64(0.005)
    opt.param_groups[0]["betas"] = (np.float32(0.9), 0.99)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["param_groups"][0]["lr"] == 0.005 and isinstance(
        loaded["param_groups"][0]["betas"][0], float
    )


def test_a_foreign_tensor_or_a_corrupted_step_counter_is_refused(config):
    build, _ = CONFIGS[config]
    model = toy_llama()
    opt = build(model)
    train_toy(model, opt, 1)
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        opt.tensor_index(torch.nn.Parameter(torch.zeros(3)))
    stepped = next(p for p in opt.state)
    opt.state[stepped]["step"] = torch.tensor(-1.0)
    ids = token_ids(5)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"state\['step'\]"):
        opt.step()
    _assert_same_snapshot(before, _snapshot(model, opt))
