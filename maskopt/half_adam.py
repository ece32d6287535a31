"""HalfAdam: Half Fine-Tuning (HFT) as an optimizer — AdamW on a fixed half per training round."""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch

from .optimizer import MaskedAdam, check_choice, check_range
from .selection import ALL, RANDOM

STRATEGIES = ("category", "layer", "model", "parameter")
FREEZE_MODES = ("requires_grad", "mask")
# Keys that describe the round's selection: one value for the whole optimizer.
_ROUND_KEYS = ("ratio", "strategy", "seed", "freeze")

_WHOLE = "whole"
_ENTRIES = "entries"


class HalfAdam(MaskedAdam):
    """AdamW on a ``ratio`` share of the model, reselected per training round (HFT, Algorithm 1).

    Pass ``model.named_parameters()`` so the half can be chosen per transformer layer and
    category (attention / feed-forward / norm) by :func:`maskopt.hft.plan_half`; embeddings,
    lm_head and everything outside the layer stack stay trainable. Without names it falls back
    to a random ``ratio`` share of the tensors (and warns).

    ``freeze="requires_grad"`` sets ``requires_grad=False`` on the frozen tensors, so autograd
    skips their weight gradients (HFT's time saving); ``freeze="mask"`` leaves ``requires_grad``
    alone and simply does not step them (for DDP, where toggling it mid-run breaks).
    Frozen tensors hold no optimizer state. :meth:`new_round` draws the next half from
    ``(seed, round)`` and resets the optimizer state, as a new fine-tuning stage does.

    Keyword-only planner options, passed to :func:`maskopt.hft.plan_half`: ``classify`` (a hook
    or ``{regex: category}`` for units the built-in rules don't know), ``layers`` (the layer
    stack prefix, overriding detection), ``freeze_non_layer`` (also freeze embeddings, lm_head
    and other non-layer tensors) and ``balance`` (``"count"``, the paper, or ``"numel"``).
    ``round`` starts the optimizer in that round: torch.distributed.checkpoint creates state
    (a zero step) before it loads, so a resumed HalfAdam must already hold the saved round.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        ratio: float = 0.5,
        strategy: str = "category",
        seed: int = 0,
        freeze: str = "requires_grad",
        foreach: bool | None = None,
        fused: bool | None = None,
        *,
        classify=None,
        layers=None,
        freeze_non_layer: bool = False,
        balance: str = "count",
        round: int = 0,  # noqa: A002 - the param-group key of the same name
    ) -> None:
        # Planner options live on the optimizer, not in param_groups: a callable `classify`
        # would stop the state dict from loading with torch.load(weights_only=True).
        self._plan_options = dict(classify=classify, layers=layers, freeze_non_layer=freeze_non_layer, balance=balance)
        self._built = False
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, ratio=ratio, strategy=strategy,
            seed=seed, freeze=freeze, round=round, foreach=foreach, fused=fused,
        )
        self._mode: dict[torch.Tensor, str] = {}
        super().__init__(params, defaults)
        self.plan = None
        self._built = True
        self._apply_round()

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_range("ratio", group["ratio"], 0.0, 1.0, low_open=True)
        check_choice("strategy", group["strategy"], STRATEGIES)
        check_choice("freeze", group["freeze"], FREEZE_MODES)
        for key in ("seed", "round"):
            value = group[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Invalid {key}: {value!r}; allowed: an integer >= 0")
        for key in _ROUND_KEYS + ("round",):
            if key in group and getattr(self, "param_groups", None) and group[key] != self.param_groups[0][key]:
                raise ValueError(
                    f"Invalid {key}: {group[key]!r}; HalfAdam selects one half for the whole model, so "
                    f"every param group must use {key}={self.param_groups[0][key]!r}"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_built", False):  # a group added later joins the current round
            self._apply_round()

    @property
    def round(self) -> int:
        return int(self.param_groups[0]["round"])

    def new_round(self) -> None:
        """Start the next training stage: a new half from (seed, round + 1), fresh optimizer state."""
        for group in self.param_groups:
            group["round"] += 1
        self.state.clear()
        self._apply_round()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._apply_round()

    def is_trainable(self, param: torch.Tensor) -> bool:
        """Whether ``param`` (or some of its entries) is trained in the current round."""
        return param in self._mode

    def _apply_round(self) -> None:
        group0 = self.param_groups[0]
        ratio, strategy, seed, rnd = float(group0["ratio"]), group0["strategy"], int(group0["seed"]), self.round
        params = [p for g in self.param_groups for p in g["params"]]
        if all("param_names" in g for g in self.param_groups):
            from .hft import plan_half

            names = [n for g in self.param_groups for n in g["param_names"]]
            self.plan = plan_half(
                list(zip(names, params)), ratio=ratio, strategy=strategy, seed=seed, round=rnd, **self._plan_options
            )
            self._mode = {}
            for name, p in zip(names, params):
                if name in self.plan.trainable:
                    self._mode[p] = _WHOLE
                elif name in self.plan.entry_masked:
                    self._mode[p] = _ENTRIES
        else:
            if rnd == 0:
                warnings.warn(
                    "HalfAdam got parameters without names, so it cannot pick a category-balanced half of "
                    f"each transformer layer; it trains a random {ratio:.0%} share of the tensors instead. "
                    "Pass model.named_parameters() for HFT's selection.",
                    stacklevel=3,
                )
            self.plan = None
            if strategy == "parameter":
                self._mode = {p: _ENTRIES for p in params}
            else:
                chosen = random.Random(f"maskopt.HalfAdam:{seed}:{rnd}").sample(
                    range(len(params)), min(len(params), max(1, round(ratio * len(params))))
                )
                self._mode = {params[i]: _WHOLE for i in chosen}
        if group0["freeze"] == "requires_grad":
            for p in params:
                trainable = p in self._mode
                p.requires_grad_(trainable)
                if not trainable:
                    p.grad = None

    def _selection_of(self, group, param, index):
        mode = self._mode.get(param)
        if mode is None:
            return None
        if mode == _ENTRIES and float(group["ratio"]) < 1.0:
            return (RANDOM, float(group["ratio"]), self.round)
        return (ALL, 1.0, None)
