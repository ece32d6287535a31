"""State-dict hooks, foreign checkpoints, AdamW's keywords and NumPy option values: each answered
as torch.optim.AdamW answers it, or refused clearly before any change."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from _tiny_models import toy_llama, train_toy

from maskopt import HalfAdam, MoFO, RandomBCD, mofo_param_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained(cls=MoFO, steps=2, **kwargs):
    model = toy_llama()
    opt = cls(model.named_parameters() if cls is HalfAdam else model.parameters(), lr=1e-2, **kwargs)
    train_toy(model, opt, steps)
    return model, opt


def _fresh(model, cls=MoFO, **kwargs):
    twin = toy_llama()
    twin.load_state_dict(model.state_dict())
    opt = cls(twin.named_parameters() if cls is HalfAdam else twin.parameters(), lr=1e-2, **kwargs)
    return twin, opt


def _weights_only_round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- load hooks (the rest is in test_conformance.py, for every configuration) ----------------


def test_a_post_hook_that_replaces_state_is_kept():
    model, opt = _trained()
    _, fresh = _fresh(model)
    first = fresh.param_groups[0]["params"][0]
    replacement = torch.full_like(first, 0.25)

    def replace(optimizer):
        optimizer.state[first]["exp_avg"] = replacement

    fresh.register_load_state_dict_post_hook(replace)
    fresh.register_load_state_dict_post_hook(lambda optimizer: None, prepend=True)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[first]["exp_avg"] is replacement


def test_hooks_survive_a_copy_and_a_load_keeps_the_moments_float32():
    import copy

    model, opt = _trained(moment_dtype=None)
    half = toy_llama().to(torch.bfloat16)
    bf16 = MoFO(half.parameters(), lr=1e-2)
    copied = copy.deepcopy(bf16)
    for target in (bf16, copied):
        target.load_state_dict(opt.state_dict())
        for q in target.param_groups[0]["params"]:
            assert target.state[q]["exp_avg"].dtype == torch.float32  # torch would cast to bf16


# -- foreign checkpoints ------------------------------------------------------------------------


def test_a_cpu_fused_adamw_checkpoint_loads_and_steps():
    model = toy_llama()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    train_toy(model, adamw, 2)
    twin, mofo = _fresh(model)
    mofo.load_state_dict(adamw.state_dict())
    assert mofo.param_groups[0]["fused"] is None  # how this process steps: the optimizer's own
    train_toy(twin, mofo, 1, start=2)
    assert int(mofo.state[mofo.param_groups[0]["params"][0]]["step"]) == 3


# -- NumPy values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, options",
    [
        (MoFO, dict(alpha=np.float64(0.3), block_size=np.int64(4), betas=(np.float32(0.9), 0.99))),
        (RandomBCD, dict(alpha=np.float32(0.25), seed=np.int64(3))),
        (HalfAdam, dict(ratio=np.float64(0.5), seed=np.int64(2), round=np.int64(0))),
    ],
)
def test_numpy_option_values_keep_the_state_dict_loadable_with_weights_only(cls, options):
    model, opt = _trained(cls, **options)
    loaded = _weights_only_round_trip(opt.state_dict())
    assert all(not isinstance(v, np.generic) for v in opt.param_groups[0].values())
    _, fresh = _fresh(model, cls, **options)
    fresh.load_state_dict(loaded)
    # set later, by a user or a scheduler: the state dict still loads
    opt.param_groups[0]["lr"] = np.float64(5e-3)
    assert _weights_only_round_trip(opt.state_dict())["param_groups"][0]["lr"] == 5e-3


# -- grouping ----------------------------------------------------------------------------------------


def test_mofo_param_groups_needs_names():
    model = toy_llama()
    with pytest.raises(TypeError, match="named_parameters"):
        mofo_param_groups(model.parameters())
    groups = mofo_param_groups(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# -- HalfAdam's round under loads ----------------------------------------------------------------------


def test_a_mask_checkpoint_loaded_into_a_default_half_adam_trains_what_it_restores():
    model, saver = _trained(HalfAdam, freeze="mask")
    twin, loader = _fresh(model, HalfAdam)  # freeze="requires_grad": froze half at construction
    assert not all(p.requires_grad for p in twin.parameters())
    loader.load_state_dict(saver.state_dict())
    assert loader.param_groups[0]["freeze"] == "mask"
    assert all(p.requires_grad for p in twin.parameters())
    train_toy(twin, loader, 1, start=2)
    stepped = {id(p) for p in loader.state}
    assert stepped == {id(p) for p in twin.parameters() if loader.is_trainable(p)}
    # the same after a new round
    loader.new_round()
    assert all(p.requires_grad for p in twin.parameters())
    train_toy(twin, loader, 1, start=3)
    assert {id(p) for p in loader.state} == {id(p) for p in twin.parameters() if loader.is_trainable(p)}


@pytest.mark.parametrize("key, value", [("seed", 5), ("ratio", 0.25), ("strategy", "layer"), ("round", 1)])
def test_round_settings_edited_in_param_groups_are_refused_before_any_change(key, value):
    model, opt = _trained(HalfAdam)
    trainable = {n for n, p in model.named_parameters() if opt.is_trainable(p)}
    opt.param_groups[0][key] = value
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = {id(p): int(s["step"]) for p, s in opt.state.items()}
    with pytest.raises(ValueError, match=f"Invalid {key}.*new_round"):
        train_toy(model, opt, 1, start=2)
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        opt.state_dict()  # a checkpoint no HalfAdam could load
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {id(p): int(s["step"]) for p, s in opt.state.items()} == steps
    assert {n for n, p in model.named_parameters() if opt.is_trainable(p)} == trainable
    # put back, it steps; new_round() is the way to the next round
    opt.param_groups[0][key] = {"seed": 0, "ratio": 0.5, "strategy": "category", "round": 0}[key]
    train_toy(model, opt, 1, start=2)
    opt.new_round()
    train_toy(model, opt, 1, start=3)
    assert opt.round == 1


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_a_group_added_mid_round_leaves_every_earlier_tensors_selection(named):
    """The selection is fixed within a round: a new group's tensors join it, the others keep
    theirs; the checkpoint resumes in an optimizer built with every group from the start."""
    model = toy_llama()
    extra = torch.nn.Parameter(torch.randn(8, 8))
    name = "layers.0.mlp.extra.weight"  # inside the layer stack: changes a category pool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = HalfAdam(model.named_parameters() if named else model.parameters(), lr=1e-2, seed=4)
    train_toy(model, opt, 1)
    before = {n: opt.is_trainable(p) for n, p in model.named_parameters()}
    opt.add_param_group({"params": [(name, extra)] if named else [extra]})
    assert {n: opt.is_trainable(p) for n, p in model.named_parameters()} == before
    train_toy(model, opt, 1, start=1)
    saved = _weights_only_round_trip(opt.state_dict())
    twin = toy_llama()
    twin.load_state_dict(model.state_dict())
    extra_twin = torch.nn.Parameter(extra.detach().clone())
    base = list(twin.named_parameters()) if named else list(twin.parameters())
    groups = [{"params": base}, {"params": [(name, extra_twin)] if named else [extra_twin]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = HalfAdam(groups, lr=1e-2, seed=4)
    resumed.load_state_dict(saved)
    assert {n: resumed.is_trainable(p) for n, p in twin.named_parameters()} == before
    assert resumed.is_trainable(extra_twin) == opt.is_trainable(extra)
    opt.new_round()  # a new round draws over every tensor again
    assert opt.param_groups[0]["round_sizes"] == [len(list(model.parameters())) + 1]
