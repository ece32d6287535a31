"""The units HFT selects, each placed in its layer stack and layer and given its category."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .categories import (
    FREEZE,
    KEEP,
    ClassifyHook,
    HFTClassificationError,
    as_classify_hook,
    builtin_category,
    expert_id,
    unknown_units_message,
)
from .names import stack_of, unit_key

__all__ = ["Unit", "layer_units", "pseudo_layer_units"]


@dataclass(frozen=True)
class Unit:
    """One selectable unit: a weight with its bias, or any other single parameter.

    Args:
        key: the unit key, e.g. ``"model.layers.3.self_attn.q_proj"``.
        names: its parameters' full names, in the optimizer's order.
        numel: its total number of entries.
        stack: the layer-stack prefix (``"model.layers"``); None outside the layer stacks.
        layer: the layer index inside the stack; None outside.
        rel: the path inside the layer (``"self_attn.q_proj"``); the key outside the stacks.
        category: ``"attention"``, ``"ffn"``, ...; ``"keep"``/``"freeze"`` from ``classify``;
            None outside the stacks unless ``classify`` said keep/freeze.
        expert: the expert id for per-expert modules (``experts.<e>.w1``), else None.
    """

    key: str
    names: tuple[str, ...]
    numel: int
    stack: str | None
    layer: int | None
    rel: str
    category: str | None
    expert: str | None = None


def _by_unit(named: Sequence[tuple[str, torch.Tensor]]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """``{unit key: its parameter names}`` in first-seen order, and every parameter's size."""
    order: dict[str, list[str]] = {}
    numel: dict[str, int] = {}
    for name, p in named:
        order.setdefault(unit_key(name), []).append(name)
        numel[name] = p.numel()
    return order, numel


def pseudo_layer_units(named: Sequence[tuple[str, torch.Tensor]]) -> list[Unit]:
    """The units of a model without a layer stack: all in one pseudo layer (stack ``""``),
    category ``"all"``, for the strategies that need no categories.

    Args:
        named: the ``(name, tensor)`` pairs.
    """
    order, numel = _by_unit(named)
    return [
        Unit(key, tuple(names), sum(numel[n] for n in names), "", 0, key, "all")
        for key, names in order.items()
    ]


def _path_modules(key: str, stack: str, modules: Mapping[str, nn.Module]) -> list[nn.Module]:
    """The modules from the layer's first child down to the unit's own module."""
    toks = key.split(".")
    base = (len(stack.split(".")) if stack else 0) + 1
    found = (modules.get(".".join(toks[:i])) for i in range(base + 1, len(toks) + 1))
    return [m for m in found if m is not None]


def layer_units(
    named: Sequence[tuple[str, torch.Tensor]],
    model: nn.Module | None,
    stacks: Sequence[str],
    classify: ClassifyHook | Mapping[str, str] | None,
    strict: bool = True,
) -> list[Unit]:
    """Units with their stack, layer and category.

    Args:
        named: the ``(name, tensor)`` pairs.
        model: the model (module types then help to classify), or None.
        stacks: the layer-stack prefixes.
        classify: the user's hook or ``{regex: category}``, asked before the built-in rules.
        strict: True (the category strategy needs every layer unit's category): units no rule
            knows raise :class:`HFTClassificationError`; False: they get the category ``"other"``.
    """
    modules = dict(model.named_modules()) if model is not None else {}
    order, numel = _by_unit(named)
    located = {k: stack_of(k, stacks) for k in order}
    has_experts = {
        (hit[0], hit[1])
        for k, hit in located.items()
        if hit and "experts" in [t.lower() for t in hit[2].split(".")]
    }
    hook = as_classify_hook(classify)

    units, unknown = [], []
    for key, names in order.items():
        hit = located[key]
        owner = (
            modules.get(key) if key in modules else modules.get(key.rpartition(".")[0]) if modules else None
        )
        cat = hook(key, owner) if hook is not None else None
        if cat is not None and not isinstance(cat, str):
            raise ValueError(
                f"classify({key!r}) returned {cat!r}; expected a category name, 'keep', 'freeze' or None"
            )
        size = sum(numel[n] for n in names)
        if hit is None:
            if cat not in (None, KEEP, FREEZE):
                cat = None  # outside the layers only keep/freeze mean something
            units.append(Unit(key, tuple(names), size, None, None, key, cat))
            continue
        stack, layer, rel = hit
        if cat is None:
            path_mods = _path_modules(key, stack, modules) if modules else []
            cat = builtin_category(rel, (stack, layer) in has_experts, path_mods)
        if cat is None:
            if strict:
                unknown.append(key)
                continue
            cat = "other"
        expert = expert_id(rel) if cat == "experts" else None
        units.append(Unit(key, tuple(names), size, stack, layer, rel, cat, expert))
    if unknown:
        raise HFTClassificationError(unknown_units_message(unknown, stacks))
    return units
