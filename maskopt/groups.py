"""Param-group builders."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .hft.categories import is_norm_name


def is_bias_or_norm(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and other vectors: the entries the official MoFO code neither
    filters nor decays. A norm is recognised by its module's name with the same rule as HFT's
    ``"norm"`` category (:func:`maskopt.hft.categories.is_norm_name`).

    Args:
        name: the parameter's name, e.g. ``"model.layers.0.input_layernorm.weight"``.
        param: the parameter (any tensor with fewer than two dimensions counts as a vector).
    """
    return param.ndim < 2 or name.lower().endswith("bias") or is_norm_name(name)


def mofo_param_groups(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    *,
    weight_decay: float = 0.0,
    alpha: float | None = None,
) -> list[dict]:
    """The official MoFO grouping: matrices filtered (the optimizer's ``alpha``, or ``alpha``
    here) and decayed; biases and norms unfiltered (``alpha=1.0``) and undecayed.

    ``MoFO(mofo_param_groups(model.named_parameters(), weight_decay=0.01), lr=2e-5, alpha=0.15)``

    Args:
        named_parameters: ``model.named_parameters()``; tensors without ``requires_grad`` are left out.
        weight_decay: the matrices' weight decay (default 0.0); biases and norms get none.
        alpha: the matrices' ``alpha`` (default None: the optimizer's own).
    """
    filtered: list[tuple[str, torch.Tensor]] = []
    plain: list[tuple[str, torch.Tensor]] = []
    for item in named_parameters:
        # model.parameters() yields tensors, and unpacking a tensor of two rows would "work"
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                "mofo_param_groups needs (name, tensor) pairs: pass model.named_parameters(), "
                f"not model.parameters() (got {type(item).__name__})"
            )
        name, param = item
        if not param.requires_grad:
            continue
        (plain if is_bias_or_norm(name, param) else filtered).append((name, param))
    matrices = {"params": filtered, "weight_decay": weight_decay}
    if alpha is not None:
        matrices["alpha"] = alpha
    groups = [matrices, {"params": plain, "weight_decay": 0.0, "alpha": 1.0}]
    return [g for g in groups if g["params"]]
