"""Parameter names: units, wrapper prefixes, and the transformer layer stacks they reveal.

A *unit* is a weight together with its bias (``x.weight`` + ``x.bias``, ``x_weight`` +
``x_bias``, ``x`` + ``x_bias``); a *layer stack* is the outermost indexed container
``<prefix>.<i>.`` whose every block holds at least two units.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["unit_key", "unwrapped", "collect", "resolve_stacks", "stack_of"]

Named = list[tuple[str, torch.Tensor]]

_INT_TOKEN = re.compile(r"^\d+$")
# DDP, torch.compile, FSDP and activation checkpointing put these in front of every name
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unit_key(name: str) -> str:
    """The unit a parameter belongs to: its name without a trailing weight/bias marker.

    Args:
        name: a parameter name such as ``"model.layers.0.self_attn.q_proj.weight"``.
    """
    head, dot, leaf = name.rpartition(".")
    if dot and leaf in ("weight", "bias"):
        return head
    for suffix in ("_weight", "_bias"):
        if leaf.endswith(suffix) and len(leaf) > len(suffix):
            stem = leaf[: -len(suffix)]
            return f"{head}.{stem}" if dot else stem
    return name


def unwrapped(name: str) -> str:
    """``name`` without the wrapper prefixes, so a wrapped model draws the bare model's half.

    Args:
        name: a parameter, unit or stack name, e.g. ``"module._orig_mod.model.layers"``.
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def collect(params_or_model) -> tuple[Named, nn.Module | None]:
    """The ``(name, tensor)`` pairs to plan over, and the model when one was given.

    Args:
        params_or_model: ``model.named_parameters()`` (or any iterable of ``(name, tensor)``
            with distinct names) or an ``nn.Module``.
    """
    if isinstance(params_or_model, nn.Module):
        return list(params_or_model.named_parameters()), params_or_model
    out = []
    for item in params_or_model:
        if isinstance(item, dict):
            raise TypeError(
                "plan_half takes (name, tensor) pairs or a model, not param-group dicts; "
                "flatten the groups' named params first"
            )
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                f"plan_half takes model.named_parameters() or a model; got an item {type(item).__name__}"
            )
        out.append(item)
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate parameter names: {dup[:5]}")
    return out, None


def _split_prefix(name: str) -> list[tuple[str, int, str]]:
    """Every ``(prefix, index, rest)`` split of ``name`` at an all-digit token."""
    tokens = name.split(".")
    out = []
    for i, tok in enumerate(tokens[:-1]):
        if _INT_TOKEN.match(tok):
            out.append((".".join(tokens[:i]), int(tok), ".".join(tokens[i + 1 :])))
    return out


def _detect_stacks(
    unit_keys: Sequence[str], module_of: Callable[[str], nn.Module | None] | None
) -> list[str]:
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
            if container is not None and not isinstance(
                container, (nn.ModuleList, nn.Sequential, nn.ModuleDict)
            ):
                continue
        valid.append(prefix)
    # an inner container (the experts of a layer) repeats too; only the outermost is the stack
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


def stack_of(key: str, stacks: Sequence[str]) -> tuple[str, int, str] | None:
    """Where a unit sits: ``(stack, layer index, path inside the layer)``, or None outside.

    Args:
        key: a unit key (see :func:`unit_key`).
        stacks: the layer-stack prefixes.
    """
    for prefix, idx, rest in _split_prefix(key + ".x"):
        if prefix in stacks:
            return prefix, idx, rest[: -len(".x")] if rest.endswith(".x") else rest
    return None


def resolve_stacks(keys: Sequence[str], model: nn.Module | None, layers: Sequence[str] | None) -> list[str]:
    """The layer-stack prefixes, sorted: ``layers`` when given (each must match), else detected.

    Args:
        keys: the unit keys.
        model: the model, whose container types then confirm a detected stack; or None.
        layers: prefixes already checked (:func:`~maskopt.hft.checks.check_layers`), or None to detect.
    """
    if layers is None:
        module_of = dict(model.named_modules()).get if model is not None else None
        return _detect_stacks(keys, module_of)
    for p in layers:
        if not any(stack_of(k, [p]) for k in keys):
            raise ValueError(f"Invalid layers: no parameter name matches {p!r} followed by '.<int>.'")
    return sorted(layers)
