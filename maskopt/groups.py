"""Param-group builders."""

from __future__ import annotations

from typing import Iterable

import torch

_NORM_HINTS = ("norm", "ln_", ".ln", "layernorm")


def is_bias_or_norm(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and other vectors: the entries the official MoFO code neither
    filters nor decays."""
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith("bias") or any(h in lowered for h in _NORM_HINTS)


def mofo_param_groups(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    *,
    weight_decay: float = 0.0,
    alpha: float | None = None,
) -> list[dict]:
    """The official MoFO grouping: matrices filtered (the optimizer's ``alpha``, or ``alpha``
    here) and decayed; biases and norms unfiltered (``alpha=1.0``) and undecayed.

    ``MoFO(mofo_param_groups(model.named_parameters(), weight_decay=0.01), lr=2e-5, alpha=0.15)``
    """
    filtered, plain = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        (plain if is_bias_or_norm(name, param) else filtered).append((name, param))
    matrices = {"params": filtered, "weight_decay": weight_decay}
    if alpha is not None:
        matrices["alpha"] = alpha
    groups = [matrices, {"params": plain, "weight_decay": 0.0, "alpha": 1.0}]
    return [g for g in groups if g["params"]]
