"""The selection strategies: which layer units (or which of their entries) train in a round.

Each strategy is one function ``(pool, p, *, seed, round, balance) -> Selection`` over the
selectable layer units, registered in :data:`STRATEGY_RULES` with what it needs from the
model. The names in that registry are the allowed ``strategy=`` values.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, NamedTuple

import torch

from .. import _hash
from .names import unwrapped
from .rng import CounterRng

if TYPE_CHECKING:
    from .units import Unit

__all__ = [
    "Selection",
    "Strategy",
    "STRATEGY_RULES",
    "STRATEGIES",
    "by_category",
    "by_layer",
    "by_model",
    "by_parameter",
    "as_fraction",
    "round_half_down",
    "entry_mask",
]

NUMEL_CANDIDATES = 64  # draws tried by balance="numel"


class Selection(NamedTuple):
    """What a strategy selects, as unit keys.

    Args:
        whole: units whose tensors train whole.
        entries: units whose tensors train on a fixed random share of their entries
            (:func:`entry_mask`).
    """

    whole: frozenset[str] = frozenset()
    entries: frozenset[str] = frozenset()


def round_half_down(x: Fraction) -> int:
    """``x`` rounded to the nearest integer, halves down (the paper's ``len(layers)//2``).

    Args:
        x: the exact value.
    """
    return math.ceil(x - Fraction(1, 2))


def as_fraction(ratio: float) -> Fraction:
    """``ratio`` as the fraction its shortest decimal means: 0.3 -> 3/10, not the binary
    5404319552844595/2**54, so that 0.3 of 10 units is exactly 3.

    Args:
        ratio: the share, a float.
    """
    return Fraction(repr(float(ratio)))


def _closest_draw(
    draw: Callable[[int], set[str]], size: dict[str, int], target: Fraction, tries: int
) -> set[str]:
    """Of ``tries`` draws (``draw(i)``, i = 0, 1, ...), the first whose total size is closest to
    ``target``; stops early at an exact hit."""
    best = draw(0)
    best_score = abs(sum(size[k] for k in best) - target)
    for i in range(1, tries):
        if best_score == 0:
            break
        cand = draw(i)
        score = abs(sum(size[k] for k in cand) - target)
        if score < best_score:
            best, best_score = cand, score
    return best


def _select_category(units: Sequence[Unit], p: Fraction, rng: CounterRng, balance: str) -> set[str]:
    """The per-category floor/ceil rule over the groups (layers, or (layer, expert) pairs)."""
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        groups.setdefault((u.layer, u.expert), []).append(u)
    gkeys = list(groups)
    base = {g: math.floor(p * len(groups[g])) for g in gkeys}
    extras = round_half_down(p * len(units)) - sum(base.values())
    eligible = [g for g in gkeys if p * len(groups[g]) != base[g]]

    def draw(_: int) -> set[str]:
        ceil_groups = set(rng.sample(eligible, extras))
        out: set[str] = set()
        for g in gkeys:
            k = base[g] + (1 if g in ceil_groups else 0)
            out.update(u.key for u in rng.sample(groups[g], k))
        return out

    tries = NUMEL_CANDIDATES if balance == "numel" else 1
    return _closest_draw(draw, {u.key: u.numel for u in units}, p * sum(u.numel for u in units), tries)


def by_category(pool: Sequence[Unit], p: Fraction, *, seed: int, round: int, balance: str) -> Selection:  # noqa: A002
    """The paper's rule: in every layer stack and category with ``n`` units in each of ``L``
    layers, each layer trains ``floor(p*n)`` or ``ceil(p*n)`` units, the ceilings drawn so
    that the total is ``round(p*n*L)``.

    Args:
        pool: the selectable layer units (not keep/freeze).
        p: the ratio as an exact fraction.
        seed, round: keys of the draw.
        balance: ``"count"`` (one draw) or ``"numel"`` (the draw closest to ``p`` of the
            category's parameters).
    """
    by_cat: dict[tuple[str, str], list[Unit]] = defaultdict(list)
    for u in pool:
        assert u.stack is not None and u.category is not None, u.key  # a layer unit has both
        by_cat[(u.stack, u.category)].append(u)
    chosen: set[str] = set()
    for (stack, cat), units in sorted(by_cat.items()):
        chosen |= _select_category(
            units, p, CounterRng(seed, round, "category", unwrapped(stack), cat), balance
        )
    return Selection(whole=frozenset(chosen))


def _spread(layer_ids: Sequence[int], p: Fraction, rng: CounterRng) -> set[int]:
    """``round(p*L)`` layers evenly spaced with a random phase (every other layer at p=0.5)."""
    L = len(layer_ids)
    c = round_half_down(p * L)
    if c == 0:
        return set()
    phase = rng.uniform()
    step = Fraction(c, L)
    return {
        lid
        for i, lid in enumerate(layer_ids)
        if math.floor((i + 1) * step + phase) - math.floor(i * step + phase) == 1
    }


def by_layer(pool: Sequence[Unit], p: Fraction, *, seed: int, round: int, balance: str) -> Selection:  # noqa: A002
    """Whole layers: ``round(p*L)`` of each stack's ``L`` layers, evenly spaced from a random
    phase (every other layer at ``p = 1/2``).

    Args:
        pool: the selectable layer units.
        p: the ratio as an exact fraction.
        seed, round: keys of the draw.
        balance: unused (every layer trains whole).
    """
    layers: dict[str, set[int]] = defaultdict(set)
    for u in pool:
        assert u.stack is not None and u.layer is not None, u.key  # a layer unit has both
        layers[u.stack].add(u.layer)
    chosen: set[str] = set()
    for stack in sorted(layers):
        on = _spread(sorted(layers[stack]), p, CounterRng(seed, round, "layer", unwrapped(stack)))
        chosen |= {u.key for u in pool if u.stack == stack and u.layer in on}
    return Selection(whole=frozenset(chosen))


def by_model(pool: Sequence[Unit], p: Fraction, *, seed: int, round: int, balance: str) -> Selection:  # noqa: A002
    """``round(p * units)`` of all layer units, uniformly at random, whatever their layer or
    category.

    Args:
        pool: the selectable layer units.
        p: the ratio as an exact fraction.
        seed, round: keys of the draw.
        balance: ``"count"`` (one draw) or ``"numel"`` (the draw closest to ``p`` of the
            parameters).
    """
    k = round_half_down(p * len(pool))

    def draw(i: int) -> set[str]:
        return {u.key for u in CounterRng(seed, round, "model", i).sample(pool, k)}

    tries = NUMEL_CANDIDATES if balance == "numel" else 1
    return Selection(
        whole=frozenset(
            _closest_draw(draw, {u.key: u.numel for u in pool}, p * sum(u.numel for u in pool), tries)
        )
    )


def by_parameter(pool: Sequence[Unit], p: Fraction, *, seed: int, round: int, balance: str) -> Selection:  # noqa: A002
    """Every layer tensor trains a fixed random ``p`` share of its entries (:func:`entry_mask`).

    Args:
        pool: the selectable layer units.
        p: unused here (the masks take the ratio).
        seed, round: unused here (the masks take them).
        balance: unused.
    """
    return Selection(entries=frozenset(u.key for u in pool))


class Strategy(NamedTuple):
    """A registered strategy.

    Args:
        select: the selection function.
        needs_layers: refuse models without a layer stack (the others treat every parameter
            as a layer parameter).
        needs_categories: every layer unit must have a category (unknown ones raise).
    """

    select: Callable[..., Selection]
    needs_layers: bool
    needs_categories: bool


STRATEGY_RULES: dict[str, Strategy] = {
    "category": Strategy(by_category, needs_layers=True, needs_categories=True),
    "layer": Strategy(by_layer, needs_layers=True, needs_categories=False),
    "model": Strategy(by_model, needs_layers=False, needs_categories=False),
    "parameter": Strategy(by_parameter, needs_layers=False, needs_categories=False),
}
STRATEGIES = tuple(STRATEGY_RULES)


def entry_mask(shape, *, ratio: float, seed: int, tensor_index: int, round: int, device=None) -> torch.Tensor:  # noqa: A002
    """Trainable entries of an entry-masked tensor (strategy ``"parameter"``): the counter
    hash ``u(i) < threshold(ratio)`` keyed by (seed, tensor index, round) -- the same function
    as RandomBCD's masks with the round in place of the step, so HalfAdam and this module agree.

    Args:
        shape: the tensor's shape.
        ratio: the trained share of entries.
        seed: the plan's seed.
        tensor_index: the tensor's position in the planned list (the optimizer order).
        round: the HFT round.
        device: where to build the mask (default None: CPU).
    """
    shape = torch.Size(shape)
    u = _hash.hash_keys(math.prod(shape), _hash.stream_key(seed, tensor_index, round), device or "cpu")
    return (u < _hash.threshold(ratio)).view(shape)
