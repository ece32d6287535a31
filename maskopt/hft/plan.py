"""The plan of one HFT round (:class:`HalfPlan`), the function that makes it (:func:`plan_half`),
and :func:`find_layer_stacks`, which shows the layer stacks a plan would use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import report
from .categories import ClassifyHook
from .checks import (
    CATEGORIES,
    FREEZE,
    KEEP,
    check_balance,
    check_freeze_non_layer,
    check_layers,
    check_ratio,
    check_round,
    check_seed,
    check_strategy,
)
from .hooks import apply_selection
from .names import collect, resolve_stacks, stack_of, unit_key
from .strategies import STRATEGY_RULES, as_fraction, entry_mask
from .units import Unit, layer_units, pseudo_layer_units

__all__ = ["HalfPlan", "plan_half", "find_layer_stacks"]


class HalfPlan:
    """The result of :func:`plan_half`: which parameters train in this round.

    ``trainable``: names whose whole tensor trains. ``entry_masked``: names trained on a fixed
    random ``ratio`` share of their entries (strategy ``"parameter"`` only; the mask is
    :func:`entry_mask` of (seed, tensor index, round)). ``frozen``: everything else.
    ``names`` keeps the input order (the optimizer's), ``numel`` the sizes.

    Args:
        names: every planned parameter name, in the optimizer's order.
        numel: ``{name: number of entries}``.
        units: the :class:`Unit` s.
        stacks: ``{layer-stack prefix: number of layers}`` (empty without a stack).
        trainable: names that train whole.
        entry_masked: names that train on their :func:`entry_mask`.
        options: the planner's options (``ratio``, ``strategy``, ``seed``, ``round``,
            ``freeze_non_layer``, ``balance``, ``layers``).
    """

    def __init__(
        self,
        *,
        names: Iterable[str],
        numel: Mapping[str, int],
        units: Iterable[Unit],
        stacks: Mapping[str, int],
        trainable: Iterable[str],
        entry_masked: Iterable[str],
        options: Mapping[str, Any],
    ) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.numel: dict[str, int] = dict(numel)
        self.units: tuple[Unit, ...] = tuple(units)
        self.stacks: dict[str, int] = dict(stacks)
        self.trainable: frozenset[str] = frozenset(trainable)
        self.entry_masked: frozenset[str] = frozenset(entry_masked)
        self.frozen: frozenset[str] = frozenset(
            n for n in self.names if n not in self.trainable and n not in self.entry_masked
        )
        self.options: dict[str, Any] = dict(options)
        self.ratio: float = options["ratio"]
        self.strategy: str = options["strategy"]
        self.seed: int = options["seed"]
        self.round: int = options["round"]
        self._unit_of = {n: u for u in self.units for n in u.names}
        self._index = {n: i for i, n in enumerate(self.names)}

    # -- queries ------------------------------------------------------------------------

    def unit_of(self, name: str) -> Unit:
        """The unit a parameter belongs to.

        Args:
            name: a planned parameter name.
        """
        return self._unit_of[name]

    def category_of(self, name: str) -> str | None:
        """Category of a parameter (None outside the layer stacks).

        Args:
            name: a planned parameter name.
        """
        return self._unit_of[name].category

    def is_layer_param(self, name: str) -> bool:
        """Whether a parameter lies inside a layer stack.

        Args:
            name: a planned parameter name.
        """
        return self._unit_of[name].stack is not None

    def tensor_index(self, name: str) -> int:
        """Position of ``name`` in the planned list (the optimizer order; keys the entry masks).

        Args:
            name: a planned parameter name.
        """
        return self._index[name]

    def entry_mask(self, name: str, param: torch.Tensor | None = None) -> torch.Tensor:
        """The trainable entries of an ``entry_masked`` tensor (bool, its shape).

        Args:
            name: an entry-masked parameter name.
            param: the tensor, for its shape and device (default None: a flat CPU mask).
        """
        if name not in self.entry_masked:
            raise KeyError(f"{name!r} is not entry-masked in this plan (strategy={self.strategy!r})")
        shape = param.shape if param is not None else (self.numel[name],)
        device = param.device if param is not None else "cpu"
        return entry_mask(
            shape,
            ratio=self.ratio,
            seed=self.seed,
            tensor_index=self.tensor_index(name),
            round=self.round,
            device=device,
        )

    def without(self, names: Iterable[str]) -> HalfPlan:
        """This plan with ``names`` frozen (e.g. tensors frozen by hand, which a plan must
        never train); the draw for every other tensor is unchanged.

        Args:
            names: parameter names to move to ``frozen``.
        """
        drop = frozenset(names)
        return HalfPlan(
            names=self.names,
            numel=self.numel,
            units=self.units,
            stacks=self.stacks,
            trainable=self.trainable - drop,
            entry_masked=self.entry_masked - drop,
            options=self.options,
        )

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
        lay: list[float] = [0, 0]
        out: list[float] = [0, 0]
        for u in self.units:
            t = sum(share(n) for n in u.names)
            if u.stack is None:
                out[0] += t
                out[1] += u.numel
                continue
            lay[0] += t
            lay[1] += u.numel
            assert u.category is not None, u.key  # a unit in a stack has its category
            c = cats.setdefault(u.category, [0, 0])
            c[0] += t
            c[1] += u.numel
        order = {c: i for i, c in enumerate((*CATEGORIES, KEEP, FREEZE))}
        return dict(
            layers=tuple(lay),
            outside=tuple(out),
            all=(lay[0] + out[0], lay[1] + out[1]),
            categories={k: tuple(cats[k]) for k in sorted(cats, key=lambda c: (order.get(c, len(order)), c))},
        )

    def trainable_fraction(self, scope: str = "layers") -> float:
        """Trainable share of a scope's parameters.

        Args:
            scope: ``"layers"`` (default; the layer stacks, the paper's figure), ``"all"``
                (every parameter), ``"outside"``, or a category (``"attention"``...).
        """
        c = self.counts()
        t, n = c["categories"][scope] if scope in c["categories"] else c[scope]
        return t / n if n else 0.0

    # -- applying to a model -------------------------------------------------------------

    def apply(
        self, model: nn.Module, freeze: str = "requires_grad", optimizer: torch.optim.Optimizer | None = None
    ) -> HalfPlan:
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

        Args:
            model: the model the plan was made for (same parameter names).
            freeze: ``"requires_grad"`` (default) or ``"mask"``, as above.
            optimizer: the optimizer to hook (required by ``"mask"``; default None).
        """
        apply_selection(
            model,
            names=self.names,
            frozen=self.frozen,
            entry_masked=self.entry_masked,
            entry_mask=self.entry_mask,
            freeze=freeze,
            optimizer=optimizer,
        )
        return self

    # -- reporting -----------------------------------------------------------------------

    def __repr__(self) -> str:
        t, n = self.counts()["layers"]
        frac = f"{t / n:.4%}" if n else "n/a"
        return (
            f"HalfPlan(strategy={self.strategy!r}, ratio={self.ratio}, seed={self.seed}, round={self.round}, "
            f"layers trainable={frac}, tensors: {len(self.trainable)} trainable, "
            f"{len(self.entry_masked)} entry-masked, {len(self.frozen)} frozen)"
        )

    def summary(self) -> str:
        """A text table: per layer and category what trains, then exact trainable fractions."""
        return report.summary(self)


def _located(
    params_or_model, layers: tuple[str, ...] | None
) -> tuple[list, nn.Module | None, list[str], list[str]]:
    """The ``(name, tensor)`` pairs, the model (or None), the unit keys and the layer stacks."""
    named, model = collect(params_or_model)
    keys = list(dict.fromkeys(unit_key(n) for n, _ in named))
    return named, model, keys, resolve_stacks(keys, model, layers)


def plan_half(
    params_or_model,
    ratio: float = 0.5,
    strategy: str = "category",
    seed: int = 0,
    round: int = 0,  # noqa: A002 - HFT's name for the training stage
    *,
    freeze_non_layer: bool = False,
    classify: ClassifyHook | Mapping[str, str] | None = None,
    layers: str | Sequence[str] | None = None,
    balance: str = "count",
) -> HalfPlan:
    """Choose the half (``ratio``) of a model that trains in HFT round ``round``.

    If no layer stack is found, ``"model"`` and ``"parameter"`` treat every parameter as a
    layer parameter; ``"category"`` and ``"layer"`` raise ``ValueError``.

    Args:
        params_or_model: ``model.named_parameters()`` (a list of ``(name, tensor)`` in optimizer
            order) or the model (module types then help to classify units).
        ratio: share of each category's units that trains (0 < ratio <= 1; default 0.5, the paper).
        strategy: ``"category"`` (default, the paper's: the per-category floor/ceil rule in every
            layer), ``"layer"`` (whole layers, evenly spaced: every other layer at 0.5),
            ``"model"`` (``ratio`` of all layer units, uniformly at random), ``"parameter"``
            (every layer tensor trains a fixed random ``ratio`` of its entries this round).
        seed: an integer (default 0); the selection is a pure function of the seed, the round
            and the names/sizes.
        round: the training round, an integer >= 0 (default 0).
        freeze_non_layer: freeze everything outside the layer stacks (embeddings, lm_head, final
            norm). Default False: they train, as in the paper (Table 5: freezing them hurts).
        classify: hook for units the built-in rules do not know (see the package docstring):
            a callable ``(unit_path, module_or_None) -> category or None`` or a dict
            ``{regex: category}``; default None.
        layers: prefix(es) of the layer stack(s), overriding the detection (default None).
        balance: ``"count"`` (default; the paper: units drawn uniformly under the count rule) or
            ``"numel"``: among 64 draws under the same count rule keep the one whose trained
            parameter count is closest to ``ratio`` of the category -- matters only where units
            differ in size (fused qkv of GPT-2/Pythia, grouped-query k/v, fused experts).
    """
    p_float = check_ratio(ratio)
    check_strategy(strategy)
    seed = check_seed(seed)
    round = check_round(round)  # noqa: A001
    check_balance(balance)
    check_freeze_non_layer(freeze_non_layer)
    prefixes = check_layers(layers)
    rule = STRATEGY_RULES[strategy]

    named, model, _, stacks = _located(params_or_model, prefixes)
    if not stacks and rule.needs_layers:
        raise ValueError(
            f"strategy={strategy!r} needs a transformer layer stack, and none was found in the parameter names "
            "(repeated '<prefix>.<int>.' blocks of >= 2 units each). Pass layers='<prefix>' (e.g. 'model.layers'), "
            "or use strategy='model' or 'parameter'."
        )
    if stacks:
        units = layer_units(named, model, stacks, classify, strict=rule.needs_categories)
        stack_sizes = {s: len({u.layer for u in units if u.stack == s}) for s in stacks}
    else:
        units, stack_sizes = pseudo_layer_units(named), {}

    pool = [u for u in units if u.stack is not None and u.category not in (KEEP, FREEZE)]
    picked = rule.select(pool, as_fraction(p_float), seed=seed, round=round, balance=balance)

    trainable: set[str] = set()
    entry_masked: set[str] = set()
    for u in units:
        if u.category == FREEZE:
            continue
        if u.category == KEEP or u.key in picked.whole or (u.stack is None and not freeze_non_layer):
            trainable.update(u.names)
        elif u.key in picked.entries:
            entry_masked.update(u.names)
    options = dict(
        ratio=p_float,
        strategy=strategy,
        seed=seed,
        round=round,
        freeze_non_layer=freeze_non_layer,
        balance=balance,
        layers=layers,
    )
    return HalfPlan(
        names=[n for n, _ in named],
        numel={n: t.numel() for n, t in named},
        units=units,
        stacks=stack_sizes,
        trainable=trainable,
        entry_masked=entry_masked,
        options=options,
    )


def find_layer_stacks(params_or_model, layers: str | Sequence[str] | None = None) -> dict[str, list[int]]:
    """The transformer layer stacks: ``{prefix: [layer indices]}``.

    From names, the outermost ``<prefix>.<int>.`` container whose every block holds at least
    two units; with a model, the prefix must also be a ModuleList/Sequential/ModuleDict.

    Args:
        params_or_model: ``model.named_parameters()`` or the model.
        layers: prefix(es) that replace the detection (default None: detect).
    """
    _, _, keys, stacks = _located(params_or_model, check_layers(layers))
    out: dict[str, set[int]] = {s: set() for s in stacks}
    for k in keys:
        hit = stack_of(k, stacks)
        if hit:
            out[hit[0]].add(hit[1])
    return {s: sorted(v) for s, v in out.items()}
