"""HalfAdam driven by maskopt.hft's planner on tiny transformers models."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from maskopt.hft import entry_mask, plan_half

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
HalfAdam = pytest.importorskip("maskopt").HalfAdam


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(layers=4, seed=0, kv_heads=2):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads))


def tiny(arch):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
    elif arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4)
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                         num_experts_per_tok=2)
    elif arch == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    else:
        return tiny_llama(2)
    return transformers.AutoModelForCausalLM.from_config(cfg)


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def loss_of(model):
    return model(input_ids=IDS, labels=IDS).loss


def train(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()


def state_numel(opt):
    return sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "bert", "mixtral"])
def test_halfadam_trains_exactly_the_plan(arch):
    model = tiny(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = HalfAdam(model.named_parameters(), lr=1e-2, weight_decay=0.1, seed=3)
    plan = plan_half(model, seed=3)
    assert opt.plan.trainable == plan.trainable and opt.plan.frozen == plan.frozen
    params = dict(model.named_parameters())
    loss_of(model).backward()
    for n in plan.names:
        assert params[n].requires_grad == (n in plan.trainable)
        assert (params[n].grad is None) == (n in plan.frozen), n  # frozen: no gradient computed
    opt.step()
    train(model, opt, 2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in plan.frozen), n
    assert set(opt.state) == {params[n] for n in plan.trainable}  # state only for active tensors


def test_state_memory_is_half_of_adamw():
    model = tiny_llama(4, kv_heads=4)  # MHA: the category rule trains exactly half of the layer numel
    ref = copy.deepcopy(model)
    half = HalfAdam(model.named_parameters(), lr=1e-3)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    train(model, half, 1)
    train(ref, adamw, 1)
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
    model = tiny_llama(4)
    opt = HalfAdam(model.named_parameters(), lr=1e-2, seed=1)
    train(model, opt, 2)
    first = opt.plan.trainable
    opt.new_round()
    assert opt.round == 1 and len(opt.state) == 0
    assert opt.plan.trainable == plan_half(model, seed=1, round=1).trainable != first
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad == (n in opt.plan.trainable) for n in opt.plan.names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, 2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in opt.plan.frozen), n
    assert set(opt.state) == {params[n] for n in opt.plan.trainable}


def test_resume_reproduces_selection_and_trajectory():
    model = tiny_llama(2)
    opt = HalfAdam(model.named_parameters(), lr=1e-2, weight_decay=0.01, seed=5)
    train(model, opt, 2)
    opt.new_round()
    train(model, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 3)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = tiny_llama(2, seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2 = HalfAdam(model2.named_parameters(), lr=1e-2, weight_decay=0.01, seed=5)
    assert opt2.round == 0
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.round == 1 and opt2.plan.trainable == opt.plan.trainable
    params2 = dict(model2.named_parameters())
    assert all(params2[n].requires_grad == (n in opt2.plan.trainable) for n in opt2.plan.names)
    train(model2, opt2, 3)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n


def test_mask_mode_keeps_requires_grad_and_frozen_weights():
    model = tiny_llama(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = HalfAdam(model.named_parameters(), lr=1e-2, weight_decay=0.1, freeze="mask", seed=2)
    assert all(p.requires_grad for p in model.parameters())
    train(model, opt, 3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in opt.plan.frozen), n
    params = dict(model.named_parameters())
    assert set(opt.state) == {params[n] for n in opt.plan.trainable}


def test_parameter_strategy_masks_agree_with_hft_entry_mask():
    model = tiny_llama(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = HalfAdam(model.named_parameters(), lr=1e-2, strategy="parameter", seed=4)
    opt.new_round()  # round 1: the masks are keyed by the round
    train(model, opt, 3)
    for i, (n, p) in enumerate(model.named_parameters()):
        if n in opt.plan.entry_masked:
            keep = entry_mask(p.shape, ratio=0.5, seed=4, tensor_index=i, round=1)
            assert torch.equal(keep, opt.plan.entry_mask(n, p))
            assert torch.equal(p[~keep], before[n][~keep]), n
            assert (p[keep] != before[n][keep]).float().mean() > 0.9, n
        else:
            assert n in opt.plan.trainable and not torch.equal(p, before[n])
