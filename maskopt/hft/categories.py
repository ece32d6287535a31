"""What a unit inside a transformer layer is: attention, ffn, norm, router or experts.

The built-in rules read the unit's path inside its layer (``self_attn.q_proj``), then, when a
model was given, the module types along that path (``MyAttention``, ``SwiGLU``). A
``classify=`` hook answers first; units that neither knows raise
:class:`HFTClassificationError` with a message that shows how to write the hook.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from .names import stack_of, unit_key

__all__ = [
    "CATEGORIES",
    "KEEP",
    "FREEZE",
    "ClassifyHook",
    "HFTClassificationError",
    "is_norm_token",
    "is_norm_name",
    "builtin_category",
    "expert_id",
    "as_classify_hook",
    "unknown_units_message",
]

CATEGORIES = ("attention", "ffn", "norm", "router", "experts")
KEEP = "keep"  # classify() result: always trainable
FREEZE = "freeze"  # classify() result: always frozen

ClassifyHook = Callable[[str, "nn.Module | None"], "str | None"]


class HFTClassificationError(ValueError):
    """Some units inside the transformer layers match no category rule.

    Args:
        message: the units (as ``stack.*.path`` patterns) and how to classify them.
    """


_ATTN_EXACT = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "qkv",
    "query_key_value",
    "query",
    "key",
    "value",
    "wq",
    "wk",
    "wv",
    "wqkv",
    "in_proj",
    "out_proj",
    "c_attn",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "sinks",
}
_FFN_EXACT = {
    "intermediate",
    "output",
    "fc1",
    "fc2",
    "fc_in",
    "fc_out",
    "c_fc",
    "linear1",
    "linear2",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "w1",
    "w2",
    "w3",
    "wi",
    "wi_0",
    "wi_1",
    "shared_expert",
    "shared_experts",
}
_ROUTER_EXACT = {"gate", "router", "gating", "shared_expert_gate", "wg", "gate_network"}
_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        getattr(nn, n, None) for n in ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d")
    )
    if t is not None
)


def is_norm_token(token: str) -> bool:
    """Whether one name token names a norm: it contains ``norm`` (``input_layernorm``,
    ``LayerNorm``, ``q_norm``) or is ``ln`` followed by nothing or a non-letter (``ln``,
    ``ln_1``, ``ln_f``, ``ln2``; not ``lnk_proj``).

    Args:
        token: one dot-separated token of a name, e.g. ``"post_attention_layernorm"``.
    """
    tok = token.lower()
    return "norm" in tok or (tok.startswith("ln") and (len(tok) == 2 or not tok[2].isalpha()))


def is_norm_name(name: str) -> bool:
    """Whether a parameter belongs to a norm, judged by its module's own name (the token
    before ``.weight``/``.bias``), so a matrix inside a container called ``norm...``
    (``norm1.linear.weight``) is not a norm. The one rule for HFT's ``"norm"`` category and
    for :func:`maskopt.groups.is_bias_or_norm`.

    Args:
        name: a parameter name (``"transformer.h.0.ln_1.weight"``) or unit key.
    """
    return is_norm_token(unit_key(name).rpartition(".")[2])


def _attn_or_ffn(tok: str) -> str | None:
    t = tok.lower()
    if "attn" in t or "attention" in t or t in _ATTN_EXACT:
        return "attention"
    if (
        t in _FFN_EXACT
        or "mlp" in t
        or "ffn" in t
        or "feed_forward" in t
        or "feedforward" in t
        or "densereludense" in t
    ):
        return "ffn"
    return None


def builtin_category(rel: str, has_experts: bool, modules: Sequence[nn.Module]) -> str | None:
    """Category of the unit at path ``rel`` inside its layer, or None if no rule applies.

    Args:
        rel: the unit's path inside its layer, e.g. ``"self_attn.q_proj"``.
        has_experts: whether the unit's layer holds routed experts (then ``gate`` is a router).
        modules: the modules from the layer's first child down to the unit's owner (empty
            when only names are known); their types are a fallback for names that say nothing.
    """
    low = [t.lower() for t in rel.split(".")]
    owner = modules[-1] if modules else None
    # 1. norms: by the unit's own name, else by the owner's type
    if is_norm_token(low[-1]):
        return "norm"
    if owner is not None and (
        isinstance(owner, _NORM_TYPES) or type(owner).__name__.lower().endswith("norm")
    ):
        return "norm"
    # 2. Mixture of Experts: routed experts, then routers
    if "experts" in low:
        return "experts"
    if any(t in _ROUTER_EXACT or "router" in t for t in low) and (
        has_experts or any(t == "shared_expert_gate" or "router" in t for t in low)
    ):
        return "router"
    # 3. attention / feed-forward: the first decisive token, outermost first
    for tok in low:
        cat = _attn_or_ffn(tok)
        if cat is not None:
            return cat
    # 4. module types along the path (custom blocks: MyAttention, MyMLP, SwiGLU...)
    for mod in modules:
        name = type(mod).__name__.lower()
        if "norm" in name and "linear" not in name:
            return "norm"
        if "router" in name:
            return "router"
        if "expert" in name and "shared" not in name:
            return "experts"
        cat = _attn_or_ffn(name)
        if cat is None and any(w in name for w in ("glu", "feedforward", "perceptron")):
            cat = "ffn"
        if cat is not None:
            return cat
    return None


def expert_id(rel: str) -> str | None:
    """The expert a unit belongs to when experts are separate modules (``experts.<e>.w1``).

    Args:
        rel: the unit's path inside its layer.
    """
    toks = rel.split(".")
    low = [t.lower() for t in toks]
    if "experts" in low:
        i = low.index("experts")
        if len(toks) > i + 2:
            return toks[i + 1]
    return None


def as_classify_hook(classify: ClassifyHook | Mapping[str, str] | None) -> ClassifyHook | None:
    """``classify=`` as a callable: a dict ``{regex: category}`` becomes a hook that returns
    the category of the first regex found in the unit path.

    Args:
        classify: None, a callable ``(unit_path, module_or_None) -> category or None``, or a
            dict ``{regex: category}``.
    """
    if classify is None or callable(classify):
        return classify
    if not isinstance(classify, Mapping):
        raise ValueError(
            f"Invalid classify: {classify!r}; allowed: a callable (unit_path, module) -> "
            "category or None, or a dict {regex: category}"
        )
    patterns = [(re.compile(pat), cat) for pat, cat in classify.items()]

    def hook(path: str, module: nn.Module | None) -> str | None:
        for rx, cat in patterns:
            if rx.search(path):
                return cat
        return None

    return hook


def unknown_units_message(unknown: Sequence[str], stacks: Sequence[str]) -> str:
    """The text of :class:`HFTClassificationError`: the unknown units and how to fix it.

    Args:
        unknown: the unit keys that no rule classified.
        stacks: the layer-stack prefixes (units are listed as ``stack.*.path`` patterns).
    """
    patterns: dict[str, int] = {}
    for key in unknown:
        hit = stack_of(key, stacks)
        pat = f"{hit[0]}.*.{hit[2]}" if hit else key
        patterns[pat] = patterns.get(pat, 0) + 1
    leaf = unknown[0].rpartition(".")[2]
    example = rf"\.{re.escape(leaf)}$"
    listed = "\n".join(f"  {p}  ({n} unit{'s' if n > 1 else ''})" for p, n in patterns.items())
    return (
        "HFT cannot classify these parameter units inside the transformer layers as attention, ffn or norm:\n"
        f"{listed}\n"
        "Pass classify= to plan_half/freeze_half/half_reset (and HalfAdam): a callable "
        "(unit_path, module_or_None) -> 'attention' | 'ffn' | 'norm' | 'router' | 'experts' | any other "
        "category name | 'keep' (always train) | 'freeze' (never train) | None (built-in rules), "
        f"or a dict {{regex: category}} searched in the unit path, e.g. classify={{r'{example}': 'attention'}}; "
        "or strategy='model'/'parameter', which do not need categories."
    )
