"""Plans applied to models: freezing the unselected half, undoing it, and Half-Reset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .categories import ClassifyHook
from .hooks import remove_hooks
from .plan import HalfPlan, plan_half

__all__ = ["freeze_half", "unfreeze", "half_reset"]


def freeze_half(
    model: nn.Module,
    ratio: float = 0.5,
    strategy: str = "category",
    seed: int = 0,
    round: int = 0,  # noqa: A002 - HFT's name for the training stage
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

    Args:
        model: the model.
        ratio, strategy, seed, round, freeze_non_layer, classify, layers, balance: the plan's
            options, as in :func:`~maskopt.hft.plan_half` (defaults 0.5, ``"category"``, 0, 0,
            False, None, None, ``"count"``).
        freeze: ``"requires_grad"`` (default) or ``"mask"`` (needs ``optimizer``).
        optimizer: the optimizer to hook; default None.
    """
    plan = plan_half(
        model,
        ratio,
        strategy,
        seed,
        round,
        freeze_non_layer=freeze_non_layer,
        classify=classify,
        layers=layers,
        balance=balance,
    )
    return plan.apply(model, freeze=freeze, optimizer=optimizer)


def unfreeze(model: nn.Module) -> None:
    """Undo :func:`freeze_half`: every parameter trainable, hooks removed.

    Args:
        model: the model a plan was applied to.
    """
    remove_hooks(model)
    for p in model.parameters():
        p.requires_grad_(True)


def half_reset(
    finetuned: nn.Module,
    pretrained: nn.Module | Mapping[str, torch.Tensor],
    plan: HalfPlan | None = None,
    **plan_kwargs: Any,
) -> HalfPlan:
    """The paper's Half-Reset: set the frozen half of ``finetuned`` back to ``pretrained``.

    The plan says which half keeps the fine-tuned values (``trainable``, the ``ratio`` share
    of every category) and which is reset (``frozen``; and the frozen entries of entry-masked
    tensors). As in the paper, embeddings and lm_head keep their fine-tuned values unless
    ``freeze_non_layer=True``. Works in place (no grad) and returns the plan.

    Args:
        finetuned: the fine-tuned model, changed in place.
        pretrained: the pre-trained model, or its state dict, with the same names.
        plan: the plan to use (default None: ``plan_half(finetuned, **plan_kwargs)``).
        **plan_kwargs: :func:`~maskopt.hft.plan_half`'s options (ratio, strategy, seed, round,
            freeze_non_layer, classify, layers, balance), only without ``plan``.
    """
    if plan is None:
        plan = plan_half(finetuned, **plan_kwargs)
    elif plan_kwargs:
        raise ValueError(
            f"half_reset: pass either plan= or plan options, not both (got {sorted(plan_kwargs)})"
        )
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
                raise ValueError(
                    f"half_reset: {name!r} has shape {tuple(dst.shape)} but the pre-trained "
                    f"tensor has {tuple(src.shape)}"
                )
            src = src.to(device=dst.device, dtype=dst.dtype)
            if name in plan.entry_masked:
                keep = plan.entry_mask(name, dst)
                dst.copy_(torch.where(keep, dst, src))
            else:
                dst.copy_(src)
    return plan
