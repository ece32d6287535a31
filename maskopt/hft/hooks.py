"""The hooks that make a model train only a selection of its parameters (what
:meth:`~maskopt.hft.HalfPlan.apply` installs), kept per model so the next plan replaces them."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from .checks import check_freeze

__all__ = ["apply_selection", "remove_hooks"]

# The hook handles of the plan applied to each model, so the next plan (or unfreeze) removes
# them; weak keys, so a model that is deleted takes its entry with it.
_APPLIED: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def remove_hooks(model: nn.Module) -> None:
    """Remove the hooks the last :func:`apply_selection` installed on ``model`` (if any).

    Args:
        model: the model a selection was applied to.
    """
    for h in _APPLIED.pop(model, []):
        h.remove()


def _zero_frozen_entries(mask: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask.to(grad.device)

    return hook


def apply_selection(
    model: nn.Module,
    *,
    names: Sequence[str],
    frozen: Collection[str],
    entry_masked: Collection[str],
    entry_mask: Callable[[str, torch.Tensor], torch.Tensor],
    freeze: str = "requires_grad",
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Make ``model`` train only a selection (a plan's); see :meth:`HalfPlan.apply`.

    Args:
        model: the model to change.
        names: every selected-over parameter name (the model must have them all).
        frozen: the names that do not train.
        entry_masked: the names that train on some entries only.
        entry_mask: ``(name, tensor) -> bool mask`` of the entries that train.
        freeze: ``"requires_grad"`` (default: frozen tensors get ``requires_grad=False``) or
            ``"mask"`` (``requires_grad`` left alone; the optimizer's step skips them).
        optimizer: the optimizer to hook (required by ``"mask"``; with entry masks it also
            restores the frozen entries after each step); default None.
    """
    check_freeze(freeze)
    if freeze == "mask" and optimizer is None:
        raise ValueError(
            "freeze='mask' leaves requires_grad alone, so it needs optimizer= to skip the frozen tensors"
        )
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"the plan names parameters the model lacks: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    remove_hooks(model)
    handles: list[Any] = []
    for name in names:
        p = params[name]
        if freeze == "requires_grad":
            p.requires_grad_(name not in frozen)
        if name in frozen:
            p.grad = None
    if entry_masked:
        masks = {}
        for name in entry_masked:
            p = params[name]
            masks[name] = entry_mask(name, p)
            handles.append(p.register_hook(_zero_frozen_entries(masks[name])))
        if optimizer is not None:
            kept = {n: params[n].detach()[~m].clone() for n, m in masks.items()}

            def restore(opt, args, kwargs, kept=kept, masks=masks):
                with torch.no_grad():
                    for n, values in kept.items():
                        params[n][~masks[n]] = values.to(params[n].dtype)

            handles.append(optimizer.register_step_post_hook(restore))
    if freeze == "mask" and frozen:
        assert optimizer is not None  # checked above: freeze="mask" needs it
        frozen_params = [params[n] for n in names if n in frozen]

        def drop_frozen_grads(opt, args, kwargs, frozen_params=frozen_params):
            for p in frozen_params:
                p.grad = None

        handles.append(optimizer.register_step_pre_hook(drop_frozen_grads))
    _APPLIED[model] = handles
