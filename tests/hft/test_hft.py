"""maskopt.hft: HFT half selection on real architectures (tiny random configs, nothing downloaded)."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from fractions import Fraction

import numpy as np
import pytest
import torch
from _tiny_models import (
    causal_lm_ids,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_mixtral,
    tiny_neox,
    tiny_qwen2,
    tiny_qwen2_moe,
    train_causal_lm,
)
from torch import nn

from maskopt.groups import is_bias_or_norm
from maskopt.hft import (
    HFTClassificationError,
    entry_mask,
    find_layer_stacks,
    freeze_half,
    half_reset,
    plan_half,
    unfreeze,
)
from maskopt.hft.categories import is_norm_name

pytest.importorskip("transformers")  # most models here are transformers models


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------


def torch_encoder(layers=3):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class _Expert(nn.Module):
    def __init__(self, d=16, h=24):
        super().__init__()
        self.w1, self.w2, self.w3 = (
            nn.Linear(d, h, bias=False),
            nn.Linear(h, d, bias=False),
            nn.Linear(d, h, bias=False),
        )


class _MoEBlock(nn.Module):
    """Experts as separate modules (transformers 4.x Mixtral layout: block_sparse_moe.experts.<e>.w1)."""

    def __init__(self, d=16, experts=4):
        super().__init__()
        self.self_attn = nn.ModuleDict(
            {k: nn.Linear(d, d, bias=False) for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
        )
        self.block_sparse_moe = nn.Module()
        self.block_sparse_moe.gate = nn.Linear(d, experts, bias=False)
        self.block_sparse_moe.experts = nn.ModuleList(_Expert(d) for _ in range(experts))
        self.input_layernorm = nn.RMSNorm(d)
        self.post_attention_layernorm = nn.RMSNorm(d)


class _PerExpertMoE(nn.Module):
    def __init__(self, layers=4, experts=4, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(50, d)
        self.layers = nn.ModuleList(_MoEBlock(d, experts) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, 50, bias=False)


ARCHS = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "gpt2": tiny_gpt2,
    "gpt_neox": tiny_neox,
    "bert": tiny_bert,
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe,
    "torch_encoder": torch_encoder,
    "per_expert_moe": _PerExpertMoE,
}
STACKS = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "bert": "bert.encoder.layer",
    "mixtral": "model.layers",
    "qwen2_moe": "model.layers",
    "torch_encoder": "layers",
    "per_expert_moe": "layers",
}


def per_layer(plan, category):
    """{layer: (trained units, all units)} of one category."""
    out = defaultdict(lambda: [0, 0])
    for u in plan.units:
        if u.stack is not None and u.category == category:
            out[u.layer][1] += 1
            out[u.layer][0] += all(n in plan.trainable for n in u.names)
    return {k: tuple(v) for k, v in out.items()}


def units_of(plan, layer, category):
    return [u for u in plan.units if u.layer == layer and u.category == category]


def trained(plan, unit):
    on = [n in plan.trainable for n in unit.names]
    assert all(on) or not any(on), f"weight and bias of {unit.key} must move together"
    return on[0]


def leaf(unit):
    return unit.rel.rpartition(".")[2]


# ---------------------------------------------------------------------------------------------
# Llama: the paper's rule exactly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_llama_category_is_the_paper_exactly(seed):
    model = tiny_llama(layers=4)
    plan = plan_half(model, ratio=0.5, strategy="category", seed=seed)
    assert plan.stacks == {"model.layers": 4}
    attn, ffn, norm = per_layer(plan, "attention"), per_layer(plan, "ffn"), per_layer(plan, "norm")
    assert set(attn) == set(ffn) == set(norm) == {0, 1, 2, 3}
    assert all(v == (2, 4) for v in attn.values())  # 2 of q/k/v/o
    assert all(v == (1, 2) for v in norm.values())  # 1 of 2 norms
    assert sorted(v[0] for v in ffn.values()) == [1, 1, 2, 2]  # FFN: 2 in half the layers, 1 in the others
    for layer in range(4):
        assert sorted(leaf(u) for u in units_of(plan, layer, "attention")) == [
            "k_proj",
            "o_proj",
            "q_proj",
            "v_proj",
        ]
        assert sorted(leaf(u) for u in units_of(plan, layer, "ffn")) == ["down_proj", "gate_proj", "up_proj"]

    # exactly half of the transformer-layer parameters frozen
    layer_names = [n for n, _ in model.named_parameters() if n.startswith("model.layers.")]
    numel = {n: p.numel() for n, p in model.named_parameters()}
    frozen = sum(numel[n] for n in layer_names if n in plan.frozen)
    assert 2 * frozen == sum(numel[n] for n in layer_names)
    assert plan.trainable_fraction("layers") == 0.5
    for cat in ("attention", "ffn", "norm"):
        assert plan.trainable_fraction(cat) == 0.5
    # embeddings, final norm and lm_head trainable
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= plan.trainable
    assert plan.entry_masked == frozenset()
    assert plan.trainable | plan.frozen == set(numel)


def test_llama_odd_layer_count_follows_len_div_2():
    # Algorithm 1: mark_layers = random.sample(layers, len(layers)//2) get the ceiling
    plan = plan_half(tiny_llama(layers=3), ratio=0.5)
    assert sorted(v[0] for v in per_layer(plan, "ffn").values()) == [1, 1, 2]


def test_llama_freeze_non_layer_freezes_embeddings_and_head():
    plan = plan_half(tiny_llama(), freeze_non_layer=True)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= plan.frozen
    assert plan.trainable_fraction("all") == pytest.approx(
        plan.counts()["layers"][0] / plan.counts()["all"][1]
    )


def test_names_and_model_give_the_same_plan():
    for name, build in ARCHS.items():
        model = build()
        for strategy in ("category", "layer", "model", "parameter"):
            a = plan_half(model, strategy=strategy, seed=3, round=2)
            b = plan_half(list(model.named_parameters()), strategy=strategy, seed=3, round=2)
            assert a.trainable == b.trainable and a.entry_masked == b.entry_masked, (name, strategy)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_layer_stack_is_found(arch):
    model = ARCHS[arch]()
    stacks = find_layer_stacks(model)
    assert list(stacks) == [STACKS[arch]]
    assert stacks == find_layer_stacks(list(model.named_parameters()))
    container = model.get_submodule(STACKS[arch])
    assert isinstance(container, nn.ModuleList) and stacks[STACKS[arch]] == list(range(len(container)))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_ratio_half(arch):
    """Shared invariants: weight+bias move together, counts per category follow the rule,
    everything outside the stack trains, and the reported fraction is the real one."""
    model = ARCHS[arch]()
    plan = plan_half(model, ratio=0.5, seed=11)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    for u in plan.units:
        trained(plan, u)
        if u.stack is None:
            assert set(u.names) <= plan.trainable
    by_cat = defaultdict(list)
    for u in plan.units:
        if u.stack is not None:
            by_cat[u.category].append(u)
    for cat, units in by_cat.items():
        groups = defaultdict(list)
        for u in units:
            groups[(u.layer, u.expert)].append(u)
        for g, us in groups.items():
            k = sum(trained(plan, u) for u in us)
            assert k in (len(us) // 2, (len(us) + 1) // 2), (cat, g)
        total = sum(trained(plan, u) for u in units)
        assert total == math.ceil(Fraction(len(units), 2) - Fraction(1, 2)), cat
    t, n = plan.counts()["layers"]
    assert n == sum(numel[x] for x in numel if x.startswith(STACKS[arch] + "."))
    assert t == sum(numel[x] for x in plan.trainable if x.startswith(STACKS[arch] + "."))
    assert plan.trainable_fraction("layers") == t / n


# ---------------------------------------------------------------------------------------------
# architecture specifics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_mistral])
def test_grouped_query_attention_reports_the_real_fraction(build):
    model = build()
    numel = {n: p.numel() for n, p in model.named_parameters()}
    fracs = set()
    for seed in range(6):
        plan = plan_half(model, seed=seed)
        assert all(v == (2, 4) for v in per_layer(plan, "attention").values())
        attn_names = [n for n in numel if ".self_attn." in n]
        exact = Fraction(
            sum(numel[n] for n in attn_names if n in plan.trainable), sum(numel[n] for n in attn_names)
        )
        assert plan.trainable_fraction("attention") == float(exact)
        fracs.add(exact)
    # k/v are smaller than q/o, so 2 of 4 matrices is not half the numel in general
    assert any(f != Fraction(1, 2) for f in fracs)
    # balance="numel" keeps the count rule and lands on (or next to) half the numel
    plan = plan_half(model, seed=0, balance="numel")
    assert all(v == (2, 4) for v in per_layer(plan, "attention").values())
    assert abs(plan.trainable_fraction("attention") - 0.5) < 0.01


def test_gpt2_fused_c_attn_and_conv1d():
    model = tiny_gpt2()
    plan = plan_half(model, seed=0)
    for layer in range(4):
        attn = {leaf(u): u for u in units_of(plan, layer, "attention")}
        ffn = {leaf(u): u for u in units_of(plan, layer, "ffn")}
        norm = {leaf(u) for u in units_of(plan, layer, "norm")}
        assert (
            set(attn) == {"c_attn", "c_proj"} and set(ffn) == {"c_fc", "c_proj"} and norm == {"ln_1", "ln_2"}
        )
        assert attn["c_proj"].rel == "attn.c_proj" and ffn["c_proj"].rel == "mlp.c_proj"
        assert attn["c_attn"].names == (
            f"transformer.h.{layer}.attn.c_attn.weight",
            f"transformer.h.{layer}.attn.c_attn.bias",
        )
        assert sum(trained(plan, u) for u in attn.values()) == 1
        assert sum(trained(plan, u) for u in ffn.values()) == 1
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= plan.trainable
    # c_attn holds 3/4 of the attention numel: the count rule's fraction is a multiple of 1/8 here
    f = plan.trainable_fraction("attention")
    assert (f * 8) == pytest.approx(round(f * 8), abs=0.05)
    balanced = plan_half(model, seed=0, balance="numel")
    assert balanced.trainable_fraction("attention") == pytest.approx(0.5, abs=1e-3)


def test_gpt_neox_fused_query_key_value():
    plan = plan_half(tiny_neox(), seed=1)
    for layer in range(4):
        attn = {u.rel for u in units_of(plan, layer, "attention")}
        ffn = {u.rel for u in units_of(plan, layer, "ffn")}
        assert attn == {"attention.query_key_value", "attention.dense"}
        assert ffn == {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}
        assert per_layer(plan, "attention")[layer] == (1, 2)
    assert {
        "gpt_neox.embed_in.weight",
        "gpt_neox.final_layer_norm.weight",
        "lm_head.weight",
    } <= plan.trainable


def test_bert_dense_in_attention_output_vs_ffn_output():
    plan = plan_half(tiny_bert(), seed=2)
    cat = {u.rel: u.category for u in plan.units if u.layer == 0}
    assert cat == {
        "attention.self.query": "attention",
        "attention.self.key": "attention",
        "attention.self.value": "attention",
        "attention.output.dense": "attention",
        "attention.output.LayerNorm": "norm",
        "intermediate.dense": "ffn",
        "output.dense": "ffn",
        "output.LayerNorm": "norm",
    }
    assert all(v == (2, 4) for v in per_layer(plan, "attention").values())
    assert all(v == (1, 2) for v in per_layer(plan, "ffn").values())
    outside = [n for n in plan.names if not n.startswith("bert.encoder.layer.")]
    assert outside and set(outside) <= plan.trainable  # embeddings, MLM head


def test_torch_transformer_encoder():
    plan = plan_half(torch_encoder(layers=4), seed=0)
    for layer in range(4):
        units = {u.rel: u for u in plan.units if u.layer == layer}
        assert {r: u.category for r, u in units.items()} == {
            "self_attn.in_proj": "attention",
            "self_attn.out_proj": "attention",
            "linear1": "ffn",
            "linear2": "ffn",
            "norm1": "norm",
            "norm2": "norm",
        }
        assert units["self_attn.in_proj"].names == (
            f"layers.{layer}.self_attn.in_proj_weight",
            f"layers.{layer}.self_attn.in_proj_bias",
        )
        for cat in ("attention", "ffn", "norm"):
            assert per_layer(plan, cat)[layer] == (1, 2)


def test_mixtral_fused_experts_and_router():
    model = tiny_mixtral(layers=4)
    plan = plan_half(model, seed=0)
    for layer in range(4):
        cats = {u.rel: u.category for u in plan.units if u.layer == layer}
        assert cats["mlp.gate"] == "router"
        assert cats["mlp.experts.gate_up_proj"] == cats["mlp.experts.down_proj"] == "experts"
        assert per_layer(plan, "experts")[layer] == (1, 2)  # one of the two fused expert tensors
    # one router per layer: trained in exactly half of the layers
    assert sorted(v[0] for v in per_layer(plan, "router").values()) == [0, 0, 1, 1]
    assert all(v == (2, 4) for v in per_layer(plan, "attention").values())
    assert all(v == (1, 2) for v in per_layer(plan, "norm").values())
    # gate_up holds 2/3 of each expert: the count rule gives 1/3 or 2/3 per layer; numel balance -> 1/2
    assert plan_half(model, seed=0, balance="numel").trainable_fraction("experts") == pytest.approx(0.5)


def test_qwen2_moe_shared_expert_is_an_ffn_and_its_gate_a_router():
    plan = plan_half(tiny_qwen2_moe(layers=4), seed=5)
    cats = {u.rel: u.category for u in plan.units if u.layer == 0}
    assert cats["mlp.gate"] == cats["mlp.shared_expert_gate"] == "router"
    assert cats["mlp.experts.gate_up_proj"] == cats["mlp.experts.down_proj"] == "experts"
    assert {r for r, c in cats.items() if c == "ffn"} == {
        "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj",
        "mlp.shared_expert.down_proj",
    }
    assert sorted(v[0] for v in per_layer(plan, "ffn").values()) == [1, 1, 2, 2]  # Llama's FFN rule
    assert all(v == (1, 2) for v in per_layer(plan, "router").values())
    assert all(v == (1, 2) for v in per_layer(plan, "experts").values())


def test_per_expert_modules_each_expert_is_half_trained():
    layers, experts = 4, 4
    plan = plan_half(_PerExpertMoE(layers, experts), seed=0)
    per_expert = defaultdict(list)
    for u in plan.units:
        if u.category == "experts":
            per_expert[(u.layer, u.expert)].append(trained(plan, u))
    assert len(per_expert) == layers * experts and all(len(v) == 3 for v in per_expert.values())
    counts = Counter(sum(v) for v in per_expert.values())
    # every expert: 2 of {w1, w2, w3} in half of the (layer, expert) pairs, 1 in the others
    assert counts == Counter({1: 8, 2: 8})
    assert plan.trainable_fraction("experts") == 0.5
    assert sorted(v[0] for v in per_layer(plan, "router").values()) == [0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------
# strategies, ratios, rounds
# ---------------------------------------------------------------------------------------------


def test_layer_strategy_is_every_other_layer():
    model = tiny_llama(layers=6)
    seen = set()
    for rnd in range(8):
        plan = plan_half(model, strategy="layer", round=rnd)
        on = tuple(sorted({u.layer for u in plan.units if u.stack and trained(plan, u)}))
        assert on in ((0, 2, 4), (1, 3, 5))
        for u in plan.units:
            if u.stack is not None:
                assert trained(plan, u) == (u.layer in on)
        seen.add(on)
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= plan.trainable
    assert len(seen) == 2  # rounds switch between the even and the odd layers


def test_model_strategy_half_of_all_units():
    plan = plan_half(tiny_llama(layers=4), strategy="model", seed=4)
    layer_units = [u for u in plan.units if u.stack is not None]
    assert sum(trained(plan, u) for u in layer_units) == len(layer_units) // 2
    counts = [v[0] for v in per_layer(plan, "attention").values()]
    assert counts != [2, 2, 2, 2] or [v[0] for v in per_layer(plan, "ffn").values()] != [2, 2, 1, 1]


def test_parameter_strategy_marks_layer_tensors_for_entry_masks():
    model = tiny_llama()
    plan = plan_half(model, strategy="parameter", seed=3, round=1)
    layer_names = {n for n in plan.names if n.startswith("model.layers.")}
    assert plan.entry_masked == layer_names
    assert plan.trainable == set(plan.names) - layer_names and plan.frozen == frozenset()
    p = dict(model.named_parameters())["model.layers.1.mlp.up_proj.weight"]
    mask = plan.entry_mask("model.layers.1.mlp.up_proj.weight", p)
    assert mask.shape == p.shape and abs(mask.float().mean().item() - 0.5) < 0.05
    idx = plan.names.index("model.layers.1.mlp.up_proj.weight")
    assert torch.equal(mask, entry_mask(p.shape, ratio=0.5, seed=3, tensor_index=idx, round=1))
    assert not torch.equal(mask, entry_mask(p.shape, ratio=0.5, seed=3, tensor_index=idx, round=2))


def _synthetic(layers, n_attn, n_ffn, n_norm):
    named = [("embed.weight", torch.empty(10, 4))]
    for layer in range(layers):
        named += [(f"model.layers.{layer}.self_attn.m{j}.weight", torch.empty(4, 4)) for j in range(n_attn)]
        named += [(f"model.layers.{layer}.mlp.f{j}.weight", torch.empty(4, 4)) for j in range(n_ffn)]
        named += [(f"model.layers.{layer}.norm{j}.weight", torch.empty(4)) for j in range(n_norm)]
    return named + [("lm_head.weight", torch.empty(10, 4))]


def test_count_rule_for_any_ratio_property():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(
        layers=st.integers(1, 7),
        n_attn=st.integers(1, 5),
        n_ffn=st.integers(1, 5),
        n_norm=st.integers(1, 3),
        ratio=st.floats(0.01, 1.0),
        seed=st.integers(0, 2**40),
    )
    def check(layers, n_attn, n_ffn, n_norm, ratio, seed):
        named = _synthetic(layers, n_attn, n_ffn, n_norm)
        plan = plan_half(named, ratio=ratio, seed=seed)
        p = Fraction(repr(ratio))
        for cat, n in (("attention", n_attn), ("ffn", n_ffn), ("norm", n_norm)):
            counts = per_layer(plan, cat)
            assert len(counts) == layers
            for k, total in counts.values():
                assert total == n and k in (math.floor(p * n), math.ceil(p * n))
            assert sum(k for k, _ in counts.values()) == math.ceil(p * n * layers - Fraction(1, 2))
        again = plan_half(named, ratio=ratio, seed=seed)
        assert again.trainable == plan.trainable

    check()


def test_ratio_one_trains_everything_and_small_ratio_trains_little():
    named = _synthetic(4, 4, 3, 2)
    assert plan_half(named, ratio=1.0).frozen == frozenset()
    plan = plan_half(named, ratio=0.1)
    assert sum(v[0] for v in per_layer(plan, "attention").values()) == 2  # round(0.1*4*4) = 2


def test_rounds_are_reproducible_and_differ():
    model = tiny_llama(layers=4)
    plans = [plan_half(model, seed=9, round=r) for r in range(6)]
    again = [plan_half(list(model.named_parameters()), seed=9, round=r) for r in range(6)]
    assert [p.trainable for p in plans] == [p.trainable for p in again]
    assert len({p.trainable for p in plans}) == 6
    assert plan_half(model, seed=10, round=0).trainable != plans[0].trainable
    # over many rounds every unit trains about half of the time
    hits = Counter()
    for r in range(200):
        plan = plan_half(model, seed=9, round=r)
        hits.update(u.key for u in plan.units if u.stack and trained(plan, u))
    assert all(60 <= hits[u.key] <= 140 for u in plans[0].units if u.stack)


def test_independent_of_global_rng():
    model = tiny_llama()
    torch.manual_seed(123)
    random.seed(123)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a = plan_half(model, seed=1, round=1)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    torch.manual_seed(999)
    random.seed(999)
    b = plan_half(model, seed=1, round=1)
    assert a.trainable == b.trainable


# ---------------------------------------------------------------------------------------------
# errors and hooks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.01, float("nan"), True, "half", None])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"ratio.*0 < ratio <= 1"):
        plan_half(_synthetic(2, 4, 3, 2), ratio=ratio)


def test_bad_strategy_and_options():
    named = _synthetic(2, 4, 3, 2)
    with pytest.raises(ValueError, match=r"strategy.*'category', 'layer', 'model', 'parameter'"):
        plan_half(named, strategy="random")
    with pytest.raises(ValueError, match="round"):
        plan_half(named, round=-1)
    with pytest.raises(ValueError, match="seed"):
        plan_half(named, seed=1.5)
    with pytest.raises(ValueError, match="balance"):
        plan_half(named, balance="size")
    with pytest.raises(ValueError, match="freeze"):
        freeze_half(tiny_llama(), freeze="hooks")
    with pytest.raises(ValueError, match="optimizer"):
        freeze_half(tiny_llama(), freeze="mask")


@pytest.mark.parametrize(
    "call, shown",
    [
        (lambda named: plan_half(named, layers=5), "5"),
        (lambda named: find_layer_stacks(named, layers=5), "5"),
        (lambda named: plan_half(named, strategy="model", layers=5.0), "5.0"),
        (lambda named: plan_half(named, layers=["model.layers", 5]), "['model.layers', 5]"),
    ],
)
def test_bad_layers_names_the_argument_and_the_allowed_values(call, shown):
    with pytest.raises(ValueError) as err:
        call(_synthetic(2, 4, 3, 2))
    assert str(err.value) == (
        f"Invalid layers: {shown}; allowed: None, a prefix string such as 'model.layers', or a list of them"
    )


def test_layers_as_str_list_tuple_or_generator_give_the_same_plan():
    named = _synthetic(3, 4, 3, 2)
    want = plan_half(named, seed=2, layers="model.layers").trainable
    for layers in (["model.layers"], ("model.layers",), (p for p in ["model.layers"])):
        assert plan_half(named, seed=2, layers=layers).trainable == want
    assert find_layer_stacks(named, layers=("model.layers",)) == {"model.layers": [0, 1, 2]}


@pytest.mark.parametrize("strategy", ["category", "model", "parameter"])
def test_numpy_scalars_are_accepted_like_python_numbers(strategy):
    named = _synthetic(4, 4, 3, 2)
    want = plan_half(named, 0.5, strategy, 3, 1)
    for ratio, seed, rnd in [
        (np.float64(0.5), np.int64(3), np.int64(1)),
        (np.float32(0.5), np.int32(3), np.uint8(1)),
    ]:
        got = plan_half(named, ratio=ratio, strategy=strategy, seed=seed, round=rnd)
        assert got.trainable == want.trainable and got.entry_masked == want.entry_masked
        assert type(got.seed) is int and type(got.round) is int and type(got.ratio) is float
        assert (got.seed, got.round, got.ratio) == (3, 1, 0.5)
    assert (
        plan_half(named, ratio=np.float64(0.3), seed=np.int64(-7)).trainable
        == plan_half(named, ratio=0.3, seed=-7).trainable
    )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(seed=True), "seed"),
        (dict(seed=np.True_), "seed"),
        (dict(seed=np.float64(2.0)), "seed"),
        (dict(round=True), "round"),
        (dict(round=np.int64(-1)), "round"),
        (dict(round=2.0), "round"),
        (dict(ratio=np.True_), "ratio"),
        (dict(ratio=np.float64(1.5)), "ratio"),
        (dict(ratio="0.5"), "ratio"),
        (dict(freeze_non_layer=1), "freeze_non_layer"),
    ],
)
def test_bools_and_out_of_range_numbers_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}: "):
        plan_half(_synthetic(2, 4, 3, 2), **kwargs)


def test_check_plan_options_refuses_early_and_keeps_layers_reusable():
    from maskopt.hft.checks import check_plan_options

    kept = check_plan_options(layers=(p for p in ["model.layers"]), classify={r"\.m0$": "attention"})
    assert kept["layers"] == ("model.layers",) and kept["balance"] == "count"
    for bad, name in [
        (dict(layers=5), "layers"),
        (dict(classify=3), "classify"),
        (dict(freeze_non_layer="yes"), "freeze_non_layer"),
        (dict(balance="size"), "balance"),
    ]:
        with pytest.raises(ValueError, match=f"Invalid {name}: "):
            check_plan_options(**bad)


class _CustomBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.mixer = nn.Linear(d, d)
        self.gain = nn.Parameter(torch.ones(d))
        self.mlp = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)


class _Custom(nn.Module):
    def __init__(self, layers=4):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.blocks = nn.ModuleList(_CustomBlock() for _ in range(layers))
        self.head = nn.Linear(8, 20)


def test_unknown_units_error_lists_them_and_the_hook_fixes_it():
    model = _Custom()
    with pytest.raises(HFTClassificationError) as err:
        plan_half(model)
    msg = str(err.value)
    assert "blocks.*.mixer" in msg and "blocks.*.gain" in msg and "classify=" in msg
    assert "blocks.*.mlp" not in msg and "blocks.*.ln" not in msg
    assert isinstance(err.value, ValueError)

    seen = []

    def hook(path, module):
        seen.append((path, type(module).__name__ if module is not None else None))
        if path.endswith(".mixer"):
            return "attention"
        if path.endswith(".gain"):
            return "keep"
        return None

    plan = plan_half(model, classify=hook)
    assert ("blocks.0.mixer", "Linear") in seen
    assert all(f"blocks.{i}.gain" in plan.trainable for i in range(4))
    assert sorted(v[0] for v in per_layer(plan, "attention").values()) == [0, 0, 1, 1]
    same = plan_half(list(model.named_parameters()), classify={r"\.mixer$": "attention", r"\.gain$": "keep"})
    assert same.trainable == plan.trainable
    frozen = plan_half(model, classify={r"\.mixer$": "attention", r"\.gain$": "freeze"})
    assert all(f"blocks.{i}.gain" in frozen.frozen for i in range(4))
    # model/parameter strategies do not need categories
    assert plan_half(model, strategy="model").frozen


def test_module_types_help_where_names_do_not():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = Attention()
            self.y = nn.LayerNorm(8)
            self.z = nn.Sequential(nn.Linear(8, 8))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))

    net = Net()
    with pytest.raises(HFTClassificationError):
        plan_half(list(net.named_parameters()))
    with pytest.raises(HFTClassificationError, match=r"blocks\.\*\.z\.0"):
        plan_half(net)  # the Attention class and the LayerNorm type are recognised; z is not
    plan = plan_half(net, classify=lambda path, mod: "ffn" if ".z." in path else None)
    assert {u.rel: u.category for u in plan.units if u.layer == 0} == {
        "x.a": "attention",
        "x.b": "attention",
        "y": "norm",
        "z.0": "ffn",
    }


def test_no_layer_stack():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="layers="):
        plan_half(mlp)
    plan = plan_half(mlp, strategy="model")
    assert len(plan.trainable) == 2 and len(plan.frozen) == 2  # one of the two units
    assert plan_half(mlp, strategy="parameter").entry_masked == set(plan.names)
    named = [(f"net.{i}.weight", torch.empty(3, 3)) for i in range(3)]
    with pytest.raises(ValueError, match="layers="):
        plan_half(named)
    forced = plan_half(_synthetic(2, 2, 2, 1), layers="model.layers")
    assert forced.stacks == {"model.layers": 2}
    with pytest.raises(ValueError, match="layers"):
        plan_half(_synthetic(2, 2, 2, 1), layers="decoder.blocks")


def test_summary_table():
    plan = plan_half(tiny_llama(layers=4), seed=0)
    text = plan.summary()
    lines = text.splitlines()
    assert "strategy=category" in lines[0] and "ratio=0.5" in lines[0]
    header = next(line for line in lines if line.startswith("layer ") and "trainable" in line)
    assert all(c in header for c in ("attention", "ffn", "norm", "trainable"))
    for layer in range(4):
        row = next(line for line in lines if line.startswith(f"{layer} "))
        assert "2/4" in row and "1/2" in row
    assert "layers (all)" in text and "50.000%" in text and "outside layers" in text and "lm_head" in text
    assert "entries" in plan_half(tiny_llama(), strategy="parameter").summary()
    assert "HalfPlan(" in repr(plan)


# ---------------------------------------------------------------------------------------------
# freeze_half with stock optimizers, half_reset
# ---------------------------------------------------------------------------------------------


def test_freeze_half_requires_grad_with_adamw():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = freeze_half(model, seed=1)
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad == (n in plan.trainable) for n in plan.names)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = causal_lm_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all((params[n].grad is None) == (n in plan.frozen) for n in plan.names)  # frozen: no gradient
    opt.step()
    train_causal_lm(model, opt, 2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in plan.frozen), n
    assert len(opt.state) == len(plan.trainable)
    # next round: a new selection; unfreeze() restores everything
    plan2 = freeze_half(model, seed=1, round=1)
    assert plan2.trainable != plan.trainable
    assert all(params[n].requires_grad == (n in plan2.trainable) for n in plan2.names)
    assert all(params[n].grad is None for n in plan2.frozen)
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_half_mask_mode_leaves_requires_grad():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    plan = freeze_half(model, seed=2, freeze="mask", optimizer=opt)
    assert all(p.requires_grad for p in model.parameters())
    train_causal_lm(model, opt, 3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in plan.frozen), n
    params = dict(model.named_parameters())
    assert set(opt.state) == {params[n] for n in plan.trainable}  # no state for the frozen half
    unfreeze(model)  # hooks gone: everything moves again
    train_causal_lm(model, opt, 1)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in plan.frozen)


def test_freeze_half_parameter_strategy_keeps_frozen_entries():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    plan = freeze_half(model, strategy="parameter", seed=4, optimizer=opt)
    train_causal_lm(model, opt, 3)
    for n, p in model.named_parameters():
        if n in plan.entry_masked:
            mask = plan.entry_mask(n, p)
            assert torch.equal(p[~mask], before[n][~mask]), n
            assert (p[mask] != before[n][mask]).float().mean() > 0.9, n
        else:
            assert not torch.equal(p, before[n])


def test_half_reset_restores_the_frozen_half():
    pretrained = tiny_llama()
    finetuned = tiny_llama()
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(1.0)
    tuned = {n: p.detach().clone() for n, p in finetuned.named_parameters()}
    pre = dict(pretrained.named_parameters())
    plan = half_reset(finetuned, pretrained, seed=5)
    assert plan.trainable_fraction("layers") == 0.5
    for n, p in finetuned.named_parameters():
        assert torch.equal(p, pre[n] if n in plan.frozen else tuned[n]), n
    assert torch.equal(
        finetuned.lm_head.weight, tuned["lm_head.weight"]
    )  # embeddings/lm_head stay fine-tuned
    # a state dict works as well, and the plan can be passed in
    ft2 = tiny_llama()
    with torch.no_grad():
        for p in ft2.parameters():
            p.add_(1.0)
    half_reset(ft2, pretrained.state_dict(), plan=plan)
    assert all(torch.equal(p, dict(finetuned.named_parameters())[n]) for n, p in ft2.named_parameters())
    with pytest.raises(ValueError, match="either"):
        half_reset(ft2, pretrained, plan=plan, seed=1)


def test_half_reset_parameter_strategy_and_errors():
    pretrained, finetuned = tiny_llama(), tiny_llama()
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(1.0)
    tuned = {n: p.detach().clone() for n, p in finetuned.named_parameters()}
    plan = half_reset(finetuned, pretrained, strategy="parameter", seed=6)
    pre = dict(pretrained.named_parameters())
    for n, p in finetuned.named_parameters():
        if n in plan.entry_masked:
            keep = plan.entry_mask(n, p)
            assert torch.equal(p[keep], tuned[n][keep]) and torch.equal(p[~keep], pre[n][~keep])
    with pytest.raises(KeyError, match="model.layers"):
        half_reset(tiny_llama(), {}, seed=0)
    with pytest.raises(ValueError, match="shape"):
        half_reset(tiny_llama(layers=2), tiny_llama(layers=2, kv_heads=2), seed=0)


def test_a_wrapped_model_draws_the_same_half_as_the_bare_one():
    from maskopt.hft import plan_half

    names = [
        f"model.layers.{i}.{m}.weight"
        for i in range(4)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        )
    ]
    bare = [(n, torch.nn.Parameter(torch.zeros(2, 2))) for n in names]
    for strategy in ("category", "layer"):
        for seed in range(4):
            want = plan_half(bare, strategy=strategy, seed=seed).trainable
            for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
                wrapped = [(prefix + n, p) for n, p in bare]
                got = plan_half(wrapped, strategy=strategy, seed=seed).trainable
                assert {n[len(prefix) :] for n in got} == set(want), (strategy, seed, prefix)


# ---------------------------------------------------------------------------------------------
# the one "is this a norm" rule: HFT's "norm" category and mofo_param_groups' unfiltered group
# ---------------------------------------------------------------------------------------------

# The module's own name decides (the token before .weight/.bias): a norm is "...norm..." or
# "ln" followed by nothing or a non-letter. Matrices inside a container whose name mentions a
# norm, or whose own name merely contains the letters "ln", are matrices.
NORM_NAMES = [
    ("model.layers.0.input_layernorm.weight", True),
    ("model.layers.0.self_attn.q_norm.weight", True),
    ("bert.encoder.layer.0.attention.output.LayerNorm.weight", True),
    ("encoder.block.0.layer.1.layer_norm.weight", True),
    ("transformer.h.0.ln_1.weight", True),
    ("transformer.ln_f.bias", True),
    ("blocks.3.ln.weight", True),
    ("ln2.weight", True),
    ("norm_weight", True),
    ("model.layers.0.mlp.down_proj.weight", False),
    ("model.layers.0.self_attn.o_proj.weight", False),
    ("blocks.0.lnk_proj.weight", False),
    ("blocks.0.kiln_proj.weight", False),
    ("transformer_blocks.0.norm1.linear.weight", False),
    ("model.norm_layers.0.dense.weight", False),
]


@pytest.mark.parametrize("name, is_norm", NORM_NAMES)
def test_norm_rule_reads_the_module_name(name, is_norm):
    assert is_norm_name(name) is is_norm
    # a matrix: only the name can make it a norm
    assert is_bias_or_norm(name, torch.empty(4, 4)) is (is_norm or name.endswith("bias"))
    # vectors stay unfiltered whatever their name
    assert is_bias_or_norm(name, torch.empty(4)) is True


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hft_norm_category_and_mofo_groups_agree(arch):
    model = ARCHS[arch]()
    plan = plan_half(model)
    params = dict(model.named_parameters())
    for u in plan.units:
        if u.stack is None:
            continue
        assert (u.category == "norm") == is_norm_name(u.key), u.key
        if u.category == "norm":
            assert all(is_bias_or_norm(n, params[n]) for n in u.names), u.key
