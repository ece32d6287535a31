"""HFT's options: their allowed values, and one check per argument.

Each check raises ``ValueError("Invalid <name>: <value>; allowed ...")`` and returns the value
in the form the planner uses (``check_seed(np.int64(3)) == 3``). ``plan_half``,
``freeze_half`` and ``HalfAdam`` share them, so an option means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._checks import check_choice, check_int, check_range
from .categories import CATEGORIES, FREEZE, KEEP, ClassifyHook, as_classify_hook
from .strategies import STRATEGIES

__all__ = [
    "CATEGORIES",
    "STRATEGIES",
    "FREEZE_MODES",
    "BALANCES",
    "KEEP",
    "FREEZE",
    "check_ratio",
    "check_strategy",
    "check_seed",
    "check_round",
    "check_balance",
    "check_freeze",
    "check_freeze_non_layer",
    "check_layers",
    "check_classify",
    "check_plan_options",
]

FREEZE_MODES = ("requires_grad", "mask")
BALANCES = ("count", "numel")


def check_ratio(ratio: Any) -> float:
    """The share of each category that trains, as a float.

    Args:
        ratio: a real number (Python or numpy) with ``0 < ratio <= 1``; not a bool.
    """
    check_range("ratio", ratio, 0.0, 1.0, low_open=True)
    return float(ratio)


def check_strategy(strategy: Any) -> str:
    """The selection strategy.

    Args:
        strategy: one of :data:`STRATEGIES` (``"category"``, ``"layer"``, ``"model"``,
            ``"parameter"``).
    """
    return check_choice("strategy", strategy, STRATEGIES)


def check_seed(seed: Any) -> int:
    """The seed of the draws, as a Python int.

    Args:
        seed: an integer (Python or numpy; negative allowed); not a bool.
    """
    return check_int("seed", seed)


def check_round(round: Any) -> int:  # noqa: A002 - HFT's name for the training stage
    """The HFT training round, as a Python int.

    Args:
        round: an integer ``>= 0`` (Python or numpy); not a bool.
    """
    return check_int("round", round, low=0)


def check_balance(balance: Any) -> str:
    """How the category rule balances its draw.

    Args:
        balance: one of :data:`BALANCES`: ``"count"`` (units drawn uniformly) or ``"numel"``
            (of several draws, the one closest to ``ratio`` of the parameters).
    """
    return check_choice("balance", balance, BALANCES)


def check_freeze(freeze: Any) -> str:
    """How a plan freezes the frozen half of a model.

    Args:
        freeze: one of :data:`FREEZE_MODES`: ``"requires_grad"`` or ``"mask"``.
    """
    return check_choice("freeze", freeze, FREEZE_MODES)


def check_freeze_non_layer(freeze_non_layer: Any) -> bool:
    """Whether the parameters outside the layer stacks are frozen.

    Args:
        freeze_non_layer: ``True`` or ``False`` (a bool, not a truthy value).
    """
    return check_choice("freeze_non_layer", freeze_non_layer, (True, False))


def check_layers(layers: Any) -> tuple[str, ...] | None:
    """The layer-stack prefixes that override the detection, as a tuple (None: detect).

    Args:
        layers: None, a prefix string such as ``"model.layers"``, or a sequence (any
            iterable) of such strings.
    """
    if layers is None:
        return None
    if isinstance(layers, str):
        return (layers,)
    if isinstance(layers, Iterable):
        prefixes = tuple(layers)
        if all(isinstance(p, str) for p in prefixes):
            return prefixes
    raise ValueError(
        f"Invalid layers: {layers!r}; allowed: None, a prefix string such as 'model.layers', or a list of them"
    )


def check_classify(classify: Any) -> ClassifyHook | None:
    """The ``classify=`` hook as a callable (a dict ``{regex: category}`` becomes one).

    Args:
        classify: None, a callable ``(unit_path, module_or_None) -> category or None``, or a
            dict ``{regex: category}``.
    """
    return as_classify_hook(classify)


def check_plan_options(
    *, classify: Any = None, layers: Any = None, freeze_non_layer: Any = False, balance: Any = "count"
) -> dict[str, Any]:
    """Check the planner options that an optimizer keeps and passes to ``plan_half`` every
    round, so that a bad one fails when the optimizer is built, not at its first plan.

    Returns the options to keep, with ``layers`` as a tuple: a generator passed as ``layers``
    is read here, and would be empty by the next round.

    Args:
        classify: as :func:`check_classify` (default None).
        layers: as :func:`check_layers` (default None: detect).
        freeze_non_layer: as :func:`check_freeze_non_layer` (default False).
        balance: as :func:`check_balance` (default ``"count"``).
    """
    check_classify(classify)
    return dict(
        classify=classify,
        layers=check_layers(layers),
        freeze_non_layer=check_freeze_non_layer(freeze_non_layer),
        balance=check_balance(balance),
    )
