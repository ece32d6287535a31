"""HalfAdam: the round mechanics on the Llama-named toy model (no transformers needed), then
the plan of maskopt.hft's planner on tiny transformers models (skipped without transformers)."""

from __future__ import annotations

import copy
import io
from functools import partial

import pytest
import torch
from _tiny_models import (
    TinyLlama,
    causal_lm_ids,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mixtral,
    tiny_neox,
    token_ids,
    train_causal_lm,
)
from torch import nn

from maskopt import HalfAdam
from maskopt.hft import entry_mask, plan_half

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def checkpoint(model, opt):
    """The model's and the optimizer's state dicts through torch.save and a weights_only load."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- the toy model ----------------------------------------------------------------------------------


def train_step(model, opt, seed=0):
    ids = token_ids(seed, vocab=50, shape=(2, 8))
    opt.zero_grad()
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()


def test_category_half_freezes_exactly_half_of_each_layer_category_and_keeps_embeddings():
    torch.manual_seed(0)
    model = TinyLlama()
    opt = HalfAdam(model.named_parameters(), lr=1e-3)
    assert model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    assert model.model.norm.weight.requires_grad
    for layer in model.model.layers:
        attn = [
            getattr(layer.self_attn, n).weight.requires_grad for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        ]
        norms = [
            layer.input_layernorm.weight.requires_grad,
            layer.post_attention_layernorm.weight.requires_grad,
        ]
        assert sum(attn) == 2 and sum(norms) == 1
    ffn = [
        sum(getattr(layer.mlp, n).weight.requires_grad for n in ("gate_proj", "up_proj", "down_proj"))
        for layer in model.model.layers
    ]
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
    saved = checkpoint(model, opt)
    train_step(model, opt, 2)

    resumed = TinyLlama()
    resumed.load_state_dict(start)
    resumed.load_state_dict(saved["model"])
    opt2 = HalfAdam(resumed.named_parameters(), lr=1e-2, seed=9)
    opt2.load_state_dict(saved["opt"])
    assert opt2.round == 1
    assert [p.requires_grad for p in resumed.parameters()] == [p.requires_grad for p in model.parameters()]
    train_step(resumed, opt2, 2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
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


# -- tiny transformers models ----------------------------------------------------------------------

# two layers each; the Llama with grouped-query attention (2 key/value heads)
ARCHS = {
    "llama": partial(tiny_llama, kv_heads=2),
    "gpt2": tiny_gpt2,
    "gpt_neox": tiny_neox,
    "bert": tiny_bert,
    "mixtral": tiny_mixtral,
}


def state_numel(opt):
    return sum(
        v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "bert", "mixtral"])
def test_halfadam_trains_exactly_the_plan(arch):
    model = ARCHS[arch](layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = HalfAdam(model.named_parameters(), lr=1e-2, weight_decay=0.1, seed=3)
    plan = plan_half(model, seed=3)
    assert opt.plan.trainable == plan.trainable and opt.plan.frozen == plan.frozen
    params = dict(model.named_parameters())
    ids = causal_lm_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    for n in plan.names:
        assert params[n].requires_grad == (n in plan.trainable)
        assert (params[n].grad is None) == (n in plan.frozen), n  # frozen: no gradient computed
    opt.step()
    train_causal_lm(model, opt, 2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in plan.frozen), n
    assert set(opt.state) == {params[n] for n in plan.trainable}  # state only for active tensors


def test_state_memory_is_half_of_adamw():
    model = tiny_llama(4, kv_heads=4)  # MHA: the category rule trains exactly half of the layer numel
    ref = copy.deepcopy(model)
    half = HalfAdam(model.named_parameters(), lr=1e-3)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    train_causal_lm(model, half, 1)
    train_causal_lm(ref, adamw, 1)
    plan = half.plan
    numel = plan.numel
    layer = {n for n in numel if n.startswith("model.layers.")}
    assert state_numel(adamw) == 2 * sum(numel.values())
    assert state_numel(half) == 2 * sum(numel[n] for n in plan.trainable)

    # layer tensors: exactly half of AdamW's state; outside the layers (embeddings, lm_head): all of it
    def layer_state(opt, model):
        ps = {dict(model.named_parameters())[n] for n in layer}
        return sum(v.numel() for p, s in opt.state.items() if p in ps for v in s.values() if v.dim() > 0)

    assert 2 * layer_state(half, model) == layer_state(adamw, ref) == 2 * sum(numel[n] for n in layer)
    assert plan.trainable_fraction("layers") == 0.5


def test_new_round_reselects_and_resets_state():
    model = tiny_llama(4, kv_heads=2)
    opt = HalfAdam(model.named_parameters(), lr=1e-2, seed=1)
    train_causal_lm(model, opt, 2)
    first = opt.plan.trainable
    opt.new_round()
    assert opt.round == 1 and len(opt.state) == 0
    assert opt.plan.trainable == plan_half(model, seed=1, round=1).trainable != first
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad == (n in opt.plan.trainable) for n in opt.plan.names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_causal_lm(model, opt, 2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in opt.plan.frozen), n
    assert set(opt.state) == {params[n] for n in opt.plan.trainable}


def test_resume_reproduces_selection_and_trajectory():
    model = tiny_llama(2, kv_heads=2)
    opt = HalfAdam(model.named_parameters(), lr=1e-2, weight_decay=0.01, seed=5)
    train_causal_lm(model, opt, 2)
    opt.new_round()
    train_causal_lm(model, opt, 2)
    ckpt = checkpoint(model, opt)
    train_causal_lm(model, opt, 3)

    model2 = tiny_llama(2, kv_heads=2, seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2 = HalfAdam(model2.named_parameters(), lr=1e-2, weight_decay=0.01, seed=5)
    assert opt2.round == 0
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.round == 1 and opt2.plan.trainable == opt.plan.trainable
    params2 = dict(model2.named_parameters())
    assert all(params2[n].requires_grad == (n in opt2.plan.trainable) for n in opt2.plan.names)
    train_causal_lm(model2, opt2, 3)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_mask_mode_keeps_requires_grad_and_frozen_weights():
    model = tiny_llama(2, kv_heads=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = HalfAdam(model.named_parameters(), lr=1e-2, weight_decay=0.1, freeze="mask", seed=2)
    assert all(p.requires_grad for p in model.parameters())
    train_causal_lm(model, opt, 3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in opt.plan.frozen), n
    params = dict(model.named_parameters())
    assert set(opt.state) == {params[n] for n in opt.plan.trainable}


def test_parameter_strategy_masks_agree_with_hft_entry_mask():
    model = tiny_llama(2, kv_heads=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = HalfAdam(model.named_parameters(), lr=1e-2, strategy="parameter", seed=4)
    opt.new_round()  # round 1: the masks are keyed by the round
    train_causal_lm(model, opt, 3)
    for i, (n, p) in enumerate(model.named_parameters()):
        if n in opt.plan.entry_masked:
            keep = entry_mask(p.shape, ratio=0.5, seed=4, tensor_index=i, round=1)
            assert torch.equal(keep, opt.plan.entry_mask(n, p))
            assert torch.equal(p[~keep], before[n][~keep]), n
            assert (p[keep] != before[n][keep]).float().mean() > 0.9, n
        else:
            assert n in opt.plan.trainable and not torch.equal(p, before[n])
