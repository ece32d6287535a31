"""HalfAdam's round mechanics on a Llama-named toy model (no transformers needed)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from maskopt import HalfAdam

from _tiny_models import TinyLlama


def train_step(model, opt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (2, 8), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()


def layer_numel(model, trainable_only):
    return sum(p.numel() for n, p in model.named_parameters()
               if ".layers." in n and (p.requires_grad or not trainable_only))


def test_category_half_freezes_exactly_half_of_each_layer_category_and_keeps_embeddings():
    torch.manual_seed(0)
    model = TinyLlama()
    opt = HalfAdam(model.named_parameters(), lr=1e-3)
    assert model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    assert model.model.norm.weight.requires_grad
    for layer in model.model.layers:
        attn = [getattr(layer.self_attn, n).weight.requires_grad for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        norms = [layer.input_layernorm.weight.requires_grad, layer.post_attention_layernorm.weight.requires_grad]
        assert sum(attn) == 2 and sum(norms) == 1
    ffn = [sum(getattr(l.mlp, n).weight.requires_grad for n in ("gate_proj", "up_proj", "down_proj"))
           for l in model.model.layers]
    assert sorted(ffn) == [1, 1, 2, 2]  # 2 in a random half of the layers, 1 in the rest
    assert opt.plan is not None


def test_state_only_for_active_tensors_frozen_get_no_grad_and_stay_put():
    torch.manual_seed(1)
    model = TinyLlama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = HalfAdam(model.named_parameters(), lr=1e-2)
    for step in range(3):
        train_step(model, opt, step)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert len(opt.state[p]) == 3
            assert not torch.equal(p.detach(), before[name])
        else:
            assert p.grad is None and len(opt.state.get(p, {})) == 0
            assert torch.equal(p.detach(), before[name])
    state_bytes = sum(s["exp_avg"].numel() * 8 for s in opt.state.values())
    assert state_bytes < 0.75 * sum(p.numel() * 8 for p in model.parameters())


def test_new_round_reselects_resets_state_and_is_reproducible():
    torch.manual_seed(2)
    model = TinyLlama()
    opt = HalfAdam(model.named_parameters(), lr=1e-2, seed=4)
    round0 = {n for n, p in model.named_parameters() if p.requires_grad}
    train_step(model, opt)
    opt.new_round()
    assert opt.round == 1 and len(opt.state) == 0
    round1 = {n for n, p in model.named_parameters() if p.requires_grad}
    assert round1 != round0

    twin = TinyLlama()
    other = HalfAdam(twin.named_parameters(), lr=1e-2, seed=4)
    other.new_round()
    assert {n for n, p in twin.named_parameters() if p.requires_grad} == round1


def test_resume_reproduces_the_round_and_the_trajectory():
    torch.manual_seed(3)
    model = TinyLlama()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = HalfAdam(model.named_parameters(), lr=1e-2, seed=9)
    train_step(model, opt, 0)
    opt.new_round()
    train_step(model, opt, 1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train_step(model, opt, 2)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = TinyLlama()
    resumed.load_state_dict(start)
    resumed.load_state_dict(saved["model"])
    opt2 = HalfAdam(resumed.named_parameters(), lr=1e-2, seed=9)
    opt2.load_state_dict(saved["opt"])
    assert opt2.round == 1
    assert [p.requires_grad for p in resumed.parameters()] == [p.requires_grad for p in model.parameters()]
    train_step(resumed, opt2, 2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_mask_mode_keeps_requires_grad_and_skips_frozen():
    torch.manual_seed(4)
    model = TinyLlama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = HalfAdam(model.named_parameters(), lr=1e-2, freeze="mask")
    assert all(p.requires_grad for p in model.parameters())
    train_step(model, opt)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]) != opt.is_trainable(p)


def test_parameter_strategy_moves_a_fixed_half_of_entries_per_round():
    torch.manual_seed(5)
    model = TinyLlama()
    opt = HalfAdam(model.named_parameters(), lr=1e-2, strategy="parameter")
    q = model.model.layers[0].self_attn.q_proj.weight
    start = q.detach().clone()
    train_step(model, opt, 0)
    first = q.detach() != start
    train_step(model, opt, 1)
    moved = q.detach() != start
    assert torch.equal(first, moved)  # the same entries every step of the round
    assert 0.35 < moved.float().mean().item() < 0.65


def test_without_names_falls_back_to_random_tensors_and_warns():
    model = TinyLlama()
    with pytest.warns(UserWarning, match="without names"):
        opt = HalfAdam(model.parameters(), lr=1e-3, ratio=0.5)
    params = list(model.parameters())
    assert sum(opt.is_trainable(p) for p in params) == round(0.5 * len(params))


def test_a_group_added_later_joins_the_round():
    torch.manual_seed(6)
    model = TinyLlama()
    named = list(model.named_parameters())
    opt = HalfAdam(named[:-1], lr=1e-2)
    opt.add_param_group({"params": [named[-1]]})
    assert opt.is_trainable(model.lm_head.weight)
    before = model.lm_head.weight.detach().clone()
    train_step(model, opt)
    assert not torch.equal(model.lm_head.weight.detach(), before)


def test_planner_options_reach_the_plan():
    model = TinyLlama()
    HalfAdam(model.named_parameters(), freeze_non_layer=True)
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
