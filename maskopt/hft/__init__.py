"""HFT (Half Fine-Tuning) parameter selection, for ``HalfAdam`` and for any other optimizer.

The HFT paper (Algorithm 1) trains, in each training round, half of the parameters of every
transformer layer and freezes the other half, chosen per *category* inside each layer: two of
the four attention matrices, one of the two norms, and for the three feed-forward matrices two
in a random half of the layers and one in the others. Embeddings and ``lm_head`` stay
trainable (their Table 5 shows that freezing them hurts).

This module makes that a model-level operation that works on any architecture:

* :func:`plan_half` -- the selection. Takes ``model.named_parameters()`` (what an optimizer
  sees; ``HalfAdam`` calls it this way) or the model itself (then module types help to
  classify units; the result is the same whenever the names suffice). Returns a
  :class:`HalfPlan`: ``trainable``, ``entry_masked``, ``frozen`` name sets and a ``summary()``.
* :func:`freeze_half` -- plan and apply it to a model (sets ``requires_grad``), so a Hugging
  Face ``Trainer`` or any stock optimizer trains only the selected half.
* :func:`half_reset` -- the paper's pilot experiment: put the frozen half of a fine-tuned model
  back to the pre-trained weights.

Vocabulary:

* **layer stack** -- the repeated blocks ``<prefix>.<i>.`` (``model.layers.3.``,
  ``transformer.h.3.``, ``encoder.layer.3.``): the outermost indexed container whose every
  block holds at least two units. Encoder-decoder models have two stacks; each is handled on
  its own. ``layers="model.layers"`` overrides the detection.
* **unit** -- a weight together with its bias (``x.weight`` + ``x.bias``, ``x_weight`` +
  ``x_bias``, ``x`` + ``x_bias``); any other parameter is a unit of its own.
* **category** -- what a unit inside a layer is: ``"attention"``, ``"ffn"``, ``"norm"``, and
  for Mixture-of-Experts layers ``"router"`` and ``"experts"`` (see below). A unit that no rule
  recognises raises :class:`HFTClassificationError` listing it; pass ``classify=`` to fix it.

The category rule, for ratio ``p`` and a category with ``n`` units in each of ``L`` layers:
each layer trains ``floor(p*n)`` or ``ceil(p*n)`` of its units; the layers that get the
ceiling are drawn at random so that the total is ``round(p*n*L)`` (halves round down, as the
paper's ``len(layers)//2``). At ``p=0.5`` on Llama this is exactly Algorithm 1.

Mixture of Experts (the paper leaves it open). Routed experts are FFNs, so each expert is
half-trained by the FFN rule, not whole experts frozen (HFT's own finding is that the
finer-grained split forgets least, and every expert keeps learning from the tokens routed to
it): with one module per expert (``experts.<e>.w1``) the groups of the rule are the (layer,
expert) pairs -- in each expert 2 of {gate, up, down} or 1, total ``round(p*3*E*L)``; with the
fused expert tensors of transformers >= 5 (``experts.gate_up_proj``, ``experts.down_proj``,
shape ``(E, ., .)``) those two tensors are the units, so each layer trains one of them for all
its experts. Routers (``mlp.gate``/``router`` and Qwen-MoE's ``shared_expert_gate``) are their
own category (with one router per layer: trained in half of the layers). A shared expert is a
dense FFN (category ``"ffn"``).

The selection is a pure function of (parameter names and sizes, ratio, strategy, seed, round,
options): it uses its own counter-based generator, never torch's or Python's global RNG.
"""

from __future__ import annotations

import hashlib
import math
import re
import weakref
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "CATEGORIES",
    "STRATEGIES",
    "FREEZE_MODES",
    "BALANCES",
    "HFTClassificationError",
    "HalfPlan",
    "Unit",
    "plan_half",
    "freeze_half",
    "unfreeze",
    "half_reset",
    "entry_mask",
    "find_layer_stacks",
]

CATEGORIES = ("attention", "ffn", "norm", "router", "experts")
STRATEGIES = ("category", "layer", "model", "parameter")
FREEZE_MODES = ("requires_grad", "mask")
BALANCES = ("count", "numel")
KEEP = "keep"  # classify() result: always trainable
FREEZE = "freeze"  # classify() result: always frozen
_NUMEL_CANDIDATES = 64  # draws tried by balance="numel"

ClassifyHook = Callable[[str, "nn.Module | None"], "str | None"]


class HFTClassificationError(ValueError):
    """Some units inside the transformer layers match no category rule."""


# ------------------------------------------------------------------------------------------
# A small counter-based generator: deterministic in its keys, independent of global RNG state
# and of the Python version (random.Random's algorithms are not part of its contract).
# ------------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key_int(key: Any) -> int:
    if isinstance(key, str):
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return int(key) & _M64


class _Rng:
    def __init__(self, *keys: Any) -> None:
        state = 0x6A09E667F3BCC908
        for key in keys:
            state = _splitmix64(state ^ _key_int(key))
        self._state = state

    def _next(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & _M64
        return _splitmix64(self._state)

    def below(self, n: int) -> int:
        """Uniform integer in [0, n) (rejection sampling, no modulo bias)."""
        if n <= 0:
            raise ValueError("below(n) needs n > 0")
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self._next()
            if x < limit:
                return x % n

    def uniform(self) -> float:
        return (self._next() >> 11) / float(1 << 53)

    def sample(self, items: Sequence[Any], k: int) -> list[Any]:
        """``k`` distinct items, uniformly (a partial Fisher-Yates shuffle)."""
        pool = list(items)
        if not 0 <= k <= len(pool):
            raise ValueError(f"sample of {k} from {len(pool)}")
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


def _round_half_down(x: Fraction) -> int:
    return math.ceil(x - Fraction(1, 2))


def _as_fraction(ratio: float) -> Fraction:
    # repr() gives the shortest decimal that round-trips: 0.3 -> 3/10, not 5404319552844595/2**54.
    return Fraction(repr(float(ratio)))


# ------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------


def _check_args(ratio: Any, strategy: Any, seed: Any, round: Any, balance: Any) -> None:
    try:
        r = float(ratio)
        ok = not isinstance(ratio, bool) and 0.0 < r <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"Invalid ratio: {ratio!r}; allowed: 0 < ratio <= 1")
    if strategy not in STRATEGIES:
        raise ValueError(f"Invalid strategy: {strategy!r}; allowed values: {', '.join(map(repr, STRATEGIES))}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r}; allowed: an integer")
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"Invalid round: {round!r}; allowed: an integer >= 0")
    if balance not in BALANCES:
        raise ValueError(f"Invalid balance: {balance!r}; allowed values: {', '.join(map(repr, BALANCES))}")


# ------------------------------------------------------------------------------------------
# Units and layer stacks, from names
# ------------------------------------------------------------------------------------------

_INT_TOKEN = re.compile(r"^\d+$")


def unit_key(name: str) -> str:
    """The unit a parameter belongs to: its name without a trailing weight/bias marker."""
    head, dot, leaf = name.rpartition(".")
    if dot and leaf in ("weight", "bias"):
        return head
    for suffix in ("_weight", "_bias"):
        if leaf.endswith(suffix) and len(leaf) > len(suffix):
            stem = leaf[: -len(suffix)]
            return f"{head}.{stem}" if dot else stem
    return name


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _unwrapped(name: str) -> str:
    """``name`` without the prefixes DDP, torch.compile and wrappers add, so that a wrapped
    model draws the same half as the bare one for the same seed."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _split_prefix(name: str) -> list[tuple[str, int, str]]:
    """Every ``(prefix, index, rest)`` split of ``name`` at an all-digit token."""
    tokens = name.split(".")
    out = []
    for i, tok in enumerate(tokens[:-1]):
        if _INT_TOKEN.match(tok):
            out.append((".".join(tokens[:i]), int(tok), ".".join(tokens[i + 1 :])))
    return out


def _detect_stacks(unit_keys: Sequence[str], module_of: Callable[[str], "nn.Module | None"] | None) -> list[str]:
    """Prefixes of the outermost repeated-block containers whose every block has >= 2 units."""
    blocks: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for key in unit_keys:
        for prefix, idx, rest in _split_prefix(key + ".x"):
            blocks[prefix][idx].add(rest)
    valid = []
    for prefix, by_idx in blocks.items():
        if not by_idx or any(len(units) < 2 for units in by_idx.values()):
            continue
        if module_of is not None:
            container = module_of(prefix)
            if container is not None and not isinstance(container, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
                continue
        valid.append(prefix)
    # keep the outermost: drop a prefix that lies inside a block of another valid prefix
    outer = []
    for p in valid:
        inside = False
        for q in valid:
            if q == p:
                continue
            for prefix, _, _ in _split_prefix(p + ".x"):
                if prefix == q:
                    inside = True
        if not inside:
            outer.append(p)
    return sorted(outer)


def _stack_of(key: str, stacks: Sequence[str]) -> tuple[str, int, str] | None:
    for prefix, idx, rest in _split_prefix(key + ".x"):
        if prefix in stacks:
            return prefix, idx, rest[: -len(".x")] if rest.endswith(".x") else rest
    return None


# ------------------------------------------------------------------------------------------
# Classification of a unit inside a layer
# ------------------------------------------------------------------------------------------

_ATTN_EXACT = {
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "qkv", "query_key_value", "query", "key", "value",
    "wq", "wk", "wv", "wqkv", "in_proj", "out_proj", "c_attn", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
    "kv_b_proj", "sinks",
}
_FFN_EXACT = {
    "intermediate", "output", "fc1", "fc2", "fc_in", "fc_out", "c_fc", "linear1", "linear2", "dense_h_to_4h",
    "dense_4h_to_h", "gate_proj", "up_proj", "down_proj", "gate_up_proj", "w1", "w2", "w3", "wi", "wi_0", "wi_1",
    "shared_expert", "shared_experts",
}
_ROUTER_EXACT = {"gate", "router", "gating", "shared_expert_gate", "wg", "gate_network"}
_NORM_TYPES: tuple[type, ...] = tuple(
    t for t in (getattr(nn, n, None) for n in ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d"))
    if t is not None
)


def _is_norm_token(tok: str) -> bool:
    tok = tok.lower()
    return "norm" in tok or (tok.startswith("ln") and (len(tok) == 2 or not tok[2].isalpha()))


def _attn_or_ffn(tok: str) -> str | None:
    t = tok.lower()
    if "attn" in t or "attention" in t or t in _ATTN_EXACT:
        return "attention"
    if t in _FFN_EXACT or "mlp" in t or "ffn" in t or "feed_forward" in t or "feedforward" in t or "densereludense" in t:
        return "ffn"
    return None


def _builtin_category(rel: str, has_experts: bool, modules: Sequence["nn.Module"]) -> str | None:
    """Category of the unit at path ``rel`` inside its layer, or None if no rule applies.

    ``modules``: the modules from the layer's first child down to the unit's owner (empty when
    only names are known); their types are a fallback for names that say nothing."""
    toks = rel.split(".")
    low = [t.lower() for t in toks]
    owner = modules[-1] if modules else None
    # 1. norms: by the unit's own name, else by the owner's type
    if _is_norm_token(low[-1]):
        return "norm"
    if owner is not None and (isinstance(owner, _NORM_TYPES) or type(owner).__name__.lower().endswith("norm")):
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


def _expert_id(rel: str) -> str | None:
    """The expert a unit belongs to when experts are separate modules (``experts.<e>.w1``)."""
    toks = rel.split(".")
    low = [t.lower() for t in toks]
    if "experts" in low:
        i = low.index("experts")
        if len(toks) > i + 2:
            return toks[i + 1]
    return None


# ------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One selectable unit: a weight with its bias, or any other single parameter."""

    key: str  # e.g. "model.layers.3.self_attn.q_proj"
    names: tuple[str, ...]  # its parameters, e.g. (".weight", ".bias") full names
    numel: int
    stack: str | None  # "model.layers"; None outside the layer stacks
    layer: int | None
    rel: str  # path inside the layer ("self_attn.q_proj"); the key outside the stacks
    category: str | None  # "attention", "ffn", ...; None outside the stacks; "keep"/"freeze" from classify
    expert: str | None = None  # expert id for per-expert modules


class HalfPlan:
    """The result of :func:`plan_half`: which parameters train in this round.

    ``trainable``: names whose whole tensor trains. ``entry_masked``: names trained on a fixed
    random ``ratio`` share of their entries (strategy ``"parameter"`` only; the mask is
    :func:`entry_mask` of (seed, tensor index, round)). ``frozen``: everything else.
    ``names`` keeps the input order (the optimizer's), ``numel`` the sizes.
    """

    def __init__(self, *, names, numel, units, stacks, trainable, entry_masked, options) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.numel: dict[str, int] = dict(numel)
        self.units: tuple[Unit, ...] = tuple(units)
        self.stacks: dict[str, int] = dict(stacks)
        self.trainable: frozenset[str] = frozenset(trainable)
        self.entry_masked: frozenset[str] = frozenset(entry_masked)
        self.frozen: frozenset[str] = frozenset(n for n in self.names if n not in self.trainable and n not in self.entry_masked)
        self.options: dict[str, Any] = dict(options)
        self.ratio: float = options["ratio"]
        self.strategy: str = options["strategy"]
        self.seed: int = options["seed"]
        self.round: int = options["round"]
        self._unit_of = {n: u for u in self.units for n in u.names}
        self._index = {n: i for i, n in enumerate(self.names)}

    # -- queries ------------------------------------------------------------------------

    def unit_of(self, name: str) -> Unit:
        return self._unit_of[name]

    def category_of(self, name: str) -> str | None:
        """Category of a parameter (None outside the layer stacks)."""
        return self._unit_of[name].category

    def is_layer_param(self, name: str) -> bool:
        return self._unit_of[name].stack is not None

    def tensor_index(self, name: str) -> int:
        """Position of ``name`` in the planned list (the optimizer order; keys the entry masks)."""
        return self._index[name]

    def entry_mask(self, name: str, param: torch.Tensor | None = None) -> torch.Tensor:
        """The trainable entries of an ``entry_masked`` tensor (bool, its shape)."""
        if name not in self.entry_masked:
            raise KeyError(f"{name!r} is not entry-masked in this plan (strategy={self.strategy!r})")
        shape = param.shape if param is not None else (self.numel[name],)
        device = param.device if param is not None else "cpu"
        return entry_mask(shape, ratio=self.ratio, seed=self.seed, tensor_index=self.tensor_index(name),
                          round=self.round, device=device)

    def counts(self) -> dict[str, Any]:
        """Exact parameter counts: ``layers`` and ``all`` as (trainable, total), ``categories``
        as {category: (trainable, total)}, ``outside`` (trainable, total). Entry-masked tensors
        count ``ratio * numel`` (their expected share; float)."""

        def share(name: str) -> float | int:
            if name in self.trainable:
                return self.numel[name]
            if name in self.entry_masked:
                return self.ratio * self.numel[name]
            return 0

        cats: dict[str, list] = {}
        lay = [0, 0]
        out = [0, 0]
        for u in self.units:
            t = sum(share(n) for n in u.names)
            if u.stack is None:
                out[0] += t
                out[1] += u.numel
                continue
            lay[0] += t
            lay[1] += u.numel
            c = cats.setdefault(u.category, [0, 0])
            c[0] += t
            c[1] += u.numel
        order = {c: i for i, c in enumerate((*CATEGORIES, KEEP, FREEZE))}
        return dict(
            layers=tuple(lay), outside=tuple(out), all=(lay[0] + out[0], lay[1] + out[1]),
            categories={k: tuple(cats[k]) for k in sorted(cats, key=lambda c: (order.get(c, len(order)), c))},
        )

    def trainable_fraction(self, scope: str = "layers") -> float:
        """Trainable share of the parameters in the layer stacks (``"layers"``, the paper's
        figure), of all parameters (``"all"``), or of one category (``"attention"``...)."""
        c = self.counts()
        t, n = c["categories"][scope] if scope in c["categories"] else c[scope]
        return t / n if n else 0.0

    # -- applying to a model -------------------------------------------------------------

    def apply(self, model: nn.Module, freeze: str = "requires_grad", optimizer: torch.optim.Optimizer | None = None) -> "HalfPlan":
        """Make ``model`` train only this plan's selection with any optimizer.

        ``freeze="requires_grad"``: trainable and entry-masked tensors get
        ``requires_grad=True``, frozen ones ``False`` (and their stale ``.grad`` is dropped),
        so backward computes no weight gradient for them (the paper's time saving) and a stock
        optimizer built afterwards (e.g. by the HF ``Trainer``) holds no state for them.
        ``freeze="mask"``: ``requires_grad`` is left alone (for DDP/DeepSpeed, which dislike it
        changing mid-run); needs ``optimizer``: a step pre-hook sets the frozen tensors'
        ``.grad`` to None, so torch optimizers skip them (no update, no state, no weight decay).

        Entry-masked tensors (strategy ``"parameter"``): a gradient hook zeroes the frozen
        entries (exact for Adam/AdamW/SGD with weight_decay=0); with ``optimizer`` a step
        post-hook also writes the frozen entries back, which is exact for any optimizer.

        Applying a new plan to the same model first removes the previous plan's hooks.
        """
        if freeze not in FREEZE_MODES:
            raise ValueError(f"Invalid freeze: {freeze!r}; allowed values: {', '.join(map(repr, FREEZE_MODES))}")
        if freeze == "mask" and optimizer is None:
            raise ValueError("freeze='mask' leaves requires_grad alone, so it needs optimizer= to skip the frozen tensors")
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"the plan names parameters the model lacks: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        _remove_hooks(model)
        handles: list[Any] = []
        for name in self.names:
            p = params[name]
            if freeze == "requires_grad":
                p.requires_grad_(name not in self.frozen)
            if name in self.frozen:
                p.grad = None
        if self.entry_masked:
            masks = {}
            for name in self.entry_masked:
                p = params[name]
                masks[name] = self.entry_mask(name, p)
                handles.append(p.register_hook(_zero_frozen_entries(masks[name])))
            if optimizer is not None:
                kept = {n: params[n].detach()[~m].clone() for n, m in masks.items()}

                def restore(opt, args, kwargs, kept=kept, masks=masks):
                    with torch.no_grad():
                        for n, values in kept.items():
                            params[n][~masks[n]] = values.to(params[n].dtype)

                handles.append(optimizer.register_step_post_hook(restore))
        if freeze == "mask" and self.frozen:
            frozen_params = [params[n] for n in self.names if n in self.frozen]

            def drop_frozen_grads(opt, args, kwargs, frozen_params=frozen_params):
                for p in frozen_params:
                    p.grad = None

            handles.append(optimizer.register_step_pre_hook(drop_frozen_grads))
        _APPLIED[model] = handles
        return self

    # -- reporting -----------------------------------------------------------------------

    def __repr__(self) -> str:
        t, n = self.counts()["layers"]
        frac = f"{t / n:.4%}" if n else "n/a"
        return (f"HalfPlan(strategy={self.strategy!r}, ratio={self.ratio}, seed={self.seed}, round={self.round}, "
                f"layers trainable={frac}, tensors: {len(self.trainable)} trainable, "
                f"{len(self.entry_masked)} entry-masked, {len(self.frozen)} frozen)")

    def summary(self) -> str:
        """A text table: per layer and category what trains, then exact trainable fractions."""
        opts = self.options
        lines = [
            f"HFT plan: strategy={self.strategy} ratio={self.ratio} seed={self.seed} round={self.round}"
            f" balance={opts['balance']} freeze_non_layer={opts['freeze_non_layer']}"
        ]
        if not self.stacks:
            lines.append("no transformer layer stack found: every parameter counts as a layer parameter")
        for stack, n_layers in self.stacks.items():
            lines.append(f"layer stack {stack!r}: {n_layers} layers")
        lines.append("")

        def trained_share(u: Unit) -> float:
            return sum(self.numel[n] if n in self.trainable else self.ratio * self.numel[n] if n in self.entry_masked
                       else 0 for n in u.names)

        def is_on(u: Unit) -> str:
            if all(n in self.trainable for n in u.names):
                return "yes"
            if any(n in self.entry_masked for n in u.names):
                return "entries"
            return "no"

        layer_units: dict[tuple[str, int], list[Unit]] = defaultdict(list)
        for u in self.units:
            if u.stack is not None:
                layer_units[(u.stack, u.layer)].append(u)
        cats = [c for c in (*CATEGORIES, KEEP, FREEZE) if any(u.category == c for u in self.units)]
        cats += sorted({u.category for u in self.units if u.stack is not None and u.category not in cats})
        header = ["layer", *cats, "trainable"]
        rows = []
        for (stack, layer), units in sorted(layer_units.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            cells = [f"{stack}.{layer}" if len(self.stacks) > 1 else str(layer)]
            for c in cats:
                cu = [u for u in units if u.category == c]
                if not cu:
                    cells.append("-")
                    continue
                on = [u for u in cu if is_on(u) != "no"]
                if self.strategy == "parameter" and c not in (KEEP, FREEZE):
                    cells.append(f"{self.ratio:g} of entries")
                    continue
                prefix = _common_prefix([u.rel for u in cu])
                shown = [u.rel[len(prefix):] or u.rel for u in on]
                text = " ".join(shown) if len(cu) <= 8 else ""
                cells.append(f"{text} {len(on)}/{len(cu)}".strip())
            tot = sum(u.numel for u in units)
            cells.append(f"{sum(trained_share(u) for u in units) / tot:.2%}" if tot else "-")
            rows.append(cells)
        if rows:
            lines += _table(header, rows)
            lines.append("")

        c = self.counts()
        approx = "~" if self.entry_masked else ""
        rows = []
        for cat, (t, n) in c["categories"].items():
            cu = [u for u in self.units if u.stack is not None and u.category == cat]
            on = sum(1 for u in cu if is_on(u) != "no")
            rows.append([cat, f"{on}/{len(cu)}", f"{approx}{_num(t)} / {n}", f"{approx}{_pct(t, n)}"])
        t, n = c["layers"]
        rows.append(["layers (all)", "", f"{approx}{_num(t)} / {n}", f"{approx}{_pct(t, n)}"])
        outside = [u for u in self.units if u.stack is None]
        if outside:
            t2, n2 = c["outside"]
            names = ", ".join(u.rel for u in outside[:4]) + (" ..." if len(outside) > 4 else "")
            rows.append(["outside layers", f"{sum(1 for u in outside if is_on(u) != 'no')}/{len(outside)}",
                         f"{_num(t2)} / {n2}", _pct(t2, n2)])
        t3, n3 = c["all"]
        rows.append(["all parameters", "", f"{approx}{_num(t3)} / {n3}", f"{approx}{_pct(t3, n3)}"])
        lines += _table(["category", "units", "trainable / total params", "fraction"], rows)
        if outside:
            lines.append(f"outside layers: {names}")
        return "\n".join(lines)


def _num(x: float | int) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _pct(t: float, n: int) -> str:
    return f"{t / n:.3%}" if n else "-"


def _common_prefix(paths: Sequence[str]) -> str:
    if len(paths) < 2:
        head = paths[0].rpartition(".")[0] if paths else ""
        return head + "." if head else ""
    split = [p.split(".") for p in paths]
    out = []
    for toks in zip(*split):
        if all(t == toks[0] for t in toks):
            out.append(toks[0])
        else:
            break
    out = out[: min(len(s) for s in split) - 1]
    return ".".join(out) + "." if out else ""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


# ------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------


def _collect(params_or_model) -> tuple[list[tuple[str, torch.Tensor]], nn.Module | None]:
    if isinstance(params_or_model, nn.Module):
        return list(params_or_model.named_parameters()), params_or_model
    items = list(params_or_model)
    out = []
    for item in items:
        if isinstance(item, dict):
            raise TypeError("plan_half takes (name, tensor) pairs or a model, not param-group dicts; "
                            "flatten the groups' named params first")
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"plan_half takes model.named_parameters() or a model; got an item {type(item).__name__}")
        out.append(item)
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate parameter names: {dup[:5]}")
    return out, None


def find_layer_stacks(params_or_model, layers: str | Sequence[str] | None = None) -> dict[str, list[int]]:
    """The transformer layer stacks: ``{prefix: [layer indices]}``.

    From names, the outermost ``<prefix>.<int>.`` container whose every block holds at least
    two units; with a model, the prefix must also be a ModuleList/Sequential/ModuleDict.
    ``layers`` forces the prefixes."""
    named, model = _collect(params_or_model)
    keys = list(dict.fromkeys(unit_key(n) for n, _ in named))
    stacks = _resolve_stacks(keys, model, layers)
    out: dict[str, set[int]] = {s: set() for s in stacks}
    for k in keys:
        hit = _stack_of(k, stacks)
        if hit:
            out[hit[0]].add(hit[1])
    return {s: sorted(v) for s, v in out.items()}


def _resolve_stacks(keys: Sequence[str], model: nn.Module | None, layers) -> list[str]:
    if layers is None:
        module_of = None
        if model is not None:
            modules = dict(model.named_modules())
            module_of = modules.get
        return _detect_stacks(keys, module_of)
    prefixes = [layers] if isinstance(layers, str) else list(layers)
    for p in prefixes:
        if not isinstance(p, str):
            raise ValueError(f"Invalid layers: {layers!r}; allowed: a prefix string like 'model.layers' or a list of them")
        if not any(_stack_of(k, [p]) for k in keys):
            raise ValueError(f"Invalid layers: no parameter name matches {p!r} followed by '.<int>.'")
    return sorted(prefixes)


def _classify_units(named, model, stacks, classify, strict: bool = True) -> list[Unit]:
    """Units with their stack, layer and category. ``strict``: unknown layer units raise
    (the category strategy needs them); otherwise they get the category ``"other"``."""
    modules = dict(model.named_modules()) if model is not None else {}
    order: dict[str, list[str]] = {}
    numel: dict[str, int] = {}
    for name, p in named:
        order.setdefault(unit_key(name), []).append(name)
        numel[name] = p.numel()
    located = {k: _stack_of(k, stacks) for k in order}
    has_experts = {(hit[0], hit[1]) for k, hit in located.items()
                   if hit and "experts" in [t.lower() for t in hit[2].split(".")]}

    if classify is not None and not callable(classify):
        if isinstance(classify, Mapping):
            patterns = [(re.compile(pat), cat) for pat, cat in classify.items()]

            def classify(path, module, patterns=patterns):  # noqa: F811 - a dict becomes a hook
                for rx, cat in patterns:
                    if rx.search(path):
                        return cat
                return None
        else:
            raise ValueError(f"Invalid classify: {classify!r}; allowed: a callable (unit_path, module) -> "
                             "category or None, or a dict {regex: category}")

    units, unknown = [], []
    for key, names in order.items():
        hit = located[key]
        owner = modules.get(key) if key in modules else modules.get(key.rpartition(".")[0]) if modules else None
        cat = classify(key, owner) if classify is not None else None
        if cat is not None and not isinstance(cat, str):
            raise ValueError(f"classify({key!r}) returned {cat!r}; expected a category name, 'keep', 'freeze' or None")
        size = sum(numel[n] for n in names)
        if hit is None:
            if cat not in (None, KEEP, FREEZE):
                cat = None  # outside the layers only keep/freeze mean something
            units.append(Unit(key, tuple(names), size, None, None, key, cat))
            continue
        stack, layer, rel = hit
        if cat is None:
            path_mods = []
            if modules:
                toks = key.split(".")
                base = (len(stack.split(".")) if stack else 0) + 1
                for i in range(base + 1, len(toks) + 1):
                    m = modules.get(".".join(toks[:i]))
                    if m is not None:
                        path_mods.append(m)
            cat = _builtin_category(rel, (stack, layer) in has_experts, path_mods)
        if cat is None:
            if strict:
                unknown.append(key)
                continue
            cat = "other"
        expert = _expert_id(rel) if cat == "experts" else None
        units.append(Unit(key, tuple(names), size, stack, layer, rel, cat, expert))
    if unknown:
        raise HFTClassificationError(_unknown_message(unknown, stacks))
    return units


def _unknown_message(unknown: Sequence[str], stacks: Sequence[str]) -> str:
    patterns: dict[str, int] = {}
    for key in unknown:
        hit = _stack_of(key, stacks)
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


def plan_half(
    params_or_model,
    ratio: float = 0.5,
    strategy: str = "category",
    seed: int = 0,
    round: int = 0,
    *,
    freeze_non_layer: bool = False,
    classify: ClassifyHook | Mapping[str, str] | None = None,
    layers: str | Sequence[str] | None = None,
    balance: str = "count",
) -> HalfPlan:
    """Choose the half (``ratio``) of a model that trains in HFT round ``round``.

    Args:
        params_or_model: ``model.named_parameters()`` (a list of ``(name, tensor)`` in optimizer
            order) or the model (module types then help to classify units).
        ratio: share of each category's units that trains (0 < ratio <= 1; paper: 0.5).
        strategy: ``"category"`` (the paper's default: the per-category floor/ceil rule in every
            layer), ``"layer"`` (whole layers, evenly spaced: every other layer at 0.5),
            ``"model"`` (``ratio`` of all layer units, uniformly at random), ``"parameter"``
            (every layer tensor trains a fixed random ``ratio`` of its entries this round).
        seed, round: the selection is a pure function of them (and of the names/sizes).
        freeze_non_layer: freeze everything outside the layer stacks (embeddings, lm_head, final
            norm). Default False: they train, as in the paper (Table 5: freezing them hurts).
        classify: hook for units the built-in rules do not know (see module docstring).
        layers: prefix(es) of the layer stack(s), overriding the detection.
        balance: ``"count"`` (default; the paper: units drawn uniformly under the count rule) or
            ``"numel"``: among 64 draws under the same count rule keep the one whose trained
            parameter count is closest to ``ratio`` of the category -- matters only where units
            differ in size (fused qkv of GPT-2/Pythia, grouped-query k/v, fused experts).

    If no layer stack is found, ``"model"`` and ``"parameter"`` treat every parameter as a
    layer parameter; ``"category"`` and ``"layer"`` raise ``ValueError``.
    """
    _check_args(ratio, strategy, seed, round, balance)
    if not isinstance(freeze_non_layer, bool):
        raise ValueError(f"Invalid freeze_non_layer: {freeze_non_layer!r}; allowed values: True, False")
    named, model = _collect(params_or_model)
    keys = list(dict.fromkeys(unit_key(n) for n, _ in named))
    stacks = _resolve_stacks(keys, model, layers)
    if not stacks and strategy in ("category", "layer"):
        raise ValueError(
            f"strategy={strategy!r} needs a transformer layer stack, and none was found in the parameter names "
            "(repeated '<prefix>.<int>.' blocks of >= 2 units each). Pass layers='<prefix>' (e.g. 'model.layers'), "
            "or use strategy='model' or 'parameter'."
        )
    if not stacks:
        # every parameter is a "layer" parameter of one pseudo layer; no categories needed
        units = []
        order: dict[str, list[str]] = {}
        numel = {n: p.numel() for n, p in named}
        for n, _ in named:
            order.setdefault(unit_key(n), []).append(n)
        for key, names in order.items():
            units.append(Unit(key, tuple(names), sum(numel[n] for n in names), "", 0, key, "all"))
        stack_sizes: dict[str, int] = {}
    else:
        units = _classify_units(named, model, stacks, classify, strict=strategy == "category")
        stack_sizes = {s: len({u.layer for u in units if u.stack == s}) for s in stacks}

    p = _as_fraction(ratio)
    pool = [u for u in units if u.stack is not None and u.category not in (KEEP, FREEZE)]
    chosen: set[str] = set()  # unit keys
    entry_units: set[str] = set()
    if strategy == "category":
        by_cat: dict[tuple[str, str], list[Unit]] = defaultdict(list)
        for u in pool:
            by_cat[(u.stack, u.category)].append(u)
        for (stack, cat), cu in sorted(by_cat.items()):
            chosen |= _select_category(cu, p, _Rng(seed, round, "category", _unwrapped(stack), cat), balance)
    elif strategy == "layer":
        for stack in stacks:
            layer_ids = sorted({u.layer for u in pool if u.stack == stack})
            on = _spread(layer_ids, p, _Rng(seed, round, "layer", _unwrapped(stack)))
            chosen |= {u.key for u in pool if u.stack == stack and u.layer in on}
    elif strategy == "model":
        k = _round_half_down(p * len(pool))
        candidates = [_Rng(seed, round, "model", i) for i in range(_NUMEL_CANDIDATES if balance == "numel" else 1)]
        target = p * sum(u.numel for u in pool)
        best = None
        for rng in candidates:
            pick = rng.sample(pool, k)
            score = abs(sum(u.numel for u in pick) - target)
            if best is None or score < best[0]:
                best = (score, {u.key for u in pick})
        chosen |= best[1]
    else:  # parameter
        entry_units = {u.key for u in pool}

    trainable, entry_masked = set(), set()
    for u in units:
        if u.category == FREEZE:
            continue
        if u.category == KEEP or u.key in chosen or (u.stack is None and not freeze_non_layer):
            trainable.update(u.names)
        elif u.key in entry_units:
            entry_masked.update(u.names)
    options = dict(ratio=float(ratio), strategy=strategy, seed=seed, round=round,
                   freeze_non_layer=freeze_non_layer, balance=balance, layers=layers)
    return HalfPlan(names=[n for n, _ in named], numel={n: t.numel() for n, t in named}, units=units,
                    stacks=stack_sizes, trainable=trainable, entry_masked=entry_masked, options=options)


def _select_category(units: Sequence[Unit], p: Fraction, rng: _Rng, balance: str) -> set[str]:
    """The per-category floor/ceil rule over the groups (layers, or (layer, expert) pairs)."""
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        groups.setdefault((u.layer, u.expert), []).append(u)
    gkeys = list(groups)
    base = {g: math.floor(p * len(groups[g])) for g in gkeys}
    total = _round_half_down(p * len(units))
    extras = total - sum(base.values())
    eligible = [g for g in gkeys if p * len(groups[g]) != base[g]]
    target = p * sum(u.numel for u in units)

    def draw() -> set[str]:
        ceil_groups = set(rng.sample(eligible, extras))
        out = set()
        for g in gkeys:
            k = base[g] + (1 if g in ceil_groups else 0)
            out.update(u.key for u in rng.sample(groups[g], k))
        return out

    size = {u.key: u.numel for u in units}
    best = draw()
    if balance == "numel":
        best_score = abs(sum(size[k] for k in best) - target)
        for _ in range(_NUMEL_CANDIDATES - 1):
            if best_score == 0:
                break
            cand = draw()
            score = abs(sum(size[k] for k in cand) - target)
            if score < best_score:
                best, best_score = cand, score
    return best


def _spread(layer_ids: Sequence[int], p: Fraction, rng: _Rng) -> set[int]:
    """``round(p*L)`` layers evenly spaced with a random phase (every other layer at p=0.5)."""
    L = len(layer_ids)
    c = _round_half_down(p * L)
    if c == 0:
        return set()
    phase = rng.uniform()
    step = Fraction(c, L)
    return {lid for i, lid in enumerate(layer_ids) if math.floor((i + 1) * step + phase) - math.floor(i * step + phase) == 1}


# ------------------------------------------------------------------------------------------
# Entry masks (strategy "parameter")
# ------------------------------------------------------------------------------------------


def entry_mask(shape, *, ratio: float, seed: int, tensor_index: int, round: int, device=None) -> torch.Tensor:
    """Trainable entries of an entry-masked tensor: the counter hash ``u(i) < threshold(ratio)``
    keyed by (seed, tensor index, round) -- the same function as RandomBCD's masks with the
    round in place of the step, so HalfAdam and this module agree."""
    from .. import _hash

    shape = torch.Size(shape)
    u = _hash.hash_keys(math.prod(shape), _hash.stream_key(seed, tensor_index, round), device or "cpu")
    return (u < _hash.threshold(ratio)).view(shape)


def _zero_frozen_entries(mask: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask.to(grad.device)

    return hook


# ------------------------------------------------------------------------------------------
# Model-level helpers
# ------------------------------------------------------------------------------------------

_APPLIED: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def _remove_hooks(model: nn.Module) -> None:
    for h in _APPLIED.pop(model, []):
        h.remove()


def freeze_half(
    model: nn.Module,
    ratio: float = 0.5,
    strategy: str = "category",
    seed: int = 0,
    round: int = 0,
    *,
    freeze: str = "requires_grad",
    optimizer: torch.optim.Optimizer | None = None,
    freeze_non_layer: bool = False,
    classify: ClassifyHook | Mapping[str, str] | None = None,
    layers: str | Sequence[str] | None = None,
    balance: str = "count",
) -> HalfPlan:
    """Plan HFT round ``round`` for ``model`` and apply it (see :meth:`HalfPlan.apply`).

    The default sets ``requires_grad`` (trainable half True, frozen half False), so any
    optimizer created afterwards -- ``torch.optim.AdamW(p for p in model.parameters() if
    p.requires_grad)``, or the HF ``Trainer``'s own -- trains only the selected half. Call it
    again with ``round=r+1`` (and a fresh optimizer) for the next training stage. Overrides
    every parameter's ``requires_grad``; :func:`unfreeze` undoes it.
    """
    plan = plan_half(model, ratio, strategy, seed, round, freeze_non_layer=freeze_non_layer,
                     classify=classify, layers=layers, balance=balance)
    return plan.apply(model, freeze=freeze, optimizer=optimizer)


def unfreeze(model: nn.Module) -> None:
    """Undo :func:`freeze_half`: every parameter trainable, hooks removed."""
    _remove_hooks(model)
    for p in model.parameters():
        p.requires_grad_(True)


def half_reset(
    finetuned: nn.Module,
    pretrained: nn.Module | Mapping[str, torch.Tensor],
    plan: HalfPlan | None = None,
    **plan_kwargs: Any,
) -> HalfPlan:
    """The paper's Half-Reset: set the frozen half of ``finetuned`` back to ``pretrained``.

    The plan (given, or ``plan_half(finetuned, **plan_kwargs)``: ratio, strategy, seed, round,
    freeze_non_layer, classify, layers, balance) says which half keeps the fine-tuned values
    (``trainable``, the ``ratio`` share of every category) and which is reset (``frozen``; and
    the frozen entries of entry-masked tensors). As in the paper, embeddings and lm_head keep
    their fine-tuned values unless ``freeze_non_layer=True``. Works in place (no grad) and
    returns the plan. ``pretrained`` is a model or a state dict with the same names.
    """
    if plan is None:
        plan = plan_half(finetuned, **plan_kwargs)
    elif plan_kwargs:
        raise ValueError(f"half_reset: pass either plan= or plan options, not both (got {sorted(plan_kwargs)})")
    source = pretrained.state_dict() if isinstance(pretrained, nn.Module) else pretrained
    params = dict(finetuned.named_parameters())
    with torch.no_grad():
        for name in plan.names:
            if name in plan.trainable:
                continue
            if name not in source:
                raise KeyError(f"half_reset: the pre-trained weights have no {name!r}")
            dst, src = params[name], source[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"half_reset: {name!r} has shape {tuple(dst.shape)} but the pre-trained "
                                 f"tensor has {tuple(src.shape)}")
            src = src.to(device=dst.device, dtype=dst.dtype)
            if name in plan.entry_masked:
                keep = plan.entry_mask(name, dst)
                dst.copy_(torch.where(keep, dst, src))
            else:
                dst.copy_(src)
    return plan
