"""The text report of a plan (:meth:`HalfPlan.summary`): what trains per layer and category,
then the exact trainable fractions."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .categories import CATEGORIES, FREEZE, KEEP

if TYPE_CHECKING:
    from .units import Unit

__all__ = ["PlanView", "summary"]


class PlanView(Protocol):
    """What the report reads of a plan (:class:`~maskopt.hft.HalfPlan` has it all)."""

    units: tuple[Unit, ...]
    stacks: dict[str, int]
    numel: dict[str, int]
    trainable: frozenset[str]
    entry_masked: frozenset[str]
    options: dict[str, Any]
    ratio: float
    strategy: str
    seed: int
    round: int

    def counts(self) -> dict[str, Any]: ...


def _num(x: float | int) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _pct(t: float, n: int) -> str:
    return f"{t / n:.3%}" if n else "-"


def _common_prefix(paths: Sequence[str]) -> str:
    """The dotted prefix all paths share, short of each path's last token (``"self_attn."``)."""
    if len(paths) < 2:
        head = paths[0].rpartition(".")[0] if paths else ""
        return head + "." if head else ""
    split = [p.split(".") for p in paths]
    out = []
    for toks in zip(*split, strict=False):  # up to the shortest path
        if all(t == toks[0] for t in toks):
            out.append(toks[0])
        else:
            break
    out = out[: min(len(s) for s in split) - 1]
    return ".".join(out) + "." if out else ""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def _state(plan: PlanView, u: Unit) -> str:
    """``"yes"`` (trains whole), ``"entries"`` (entry-masked) or ``"no"``."""
    if all(n in plan.trainable for n in u.names):
        return "yes"
    if any(n in plan.entry_masked for n in u.names):
        return "entries"
    return "no"


def _trained_share(plan: PlanView, u: Unit) -> float:
    return sum(
        plan.numel[n] if n in plan.trainable else plan.ratio * plan.numel[n] if n in plan.entry_masked else 0
        for n in u.names
    )


def _layer_table(plan: PlanView) -> list[str]:
    """One row per layer: the trained units of each category, and the layer's trained share."""
    layer_units: dict[tuple[str, int], list[Unit]] = defaultdict(list)
    for u in plan.units:
        if u.stack is not None:
            assert u.layer is not None, u.key  # a unit in a stack has its layer
            layer_units[(u.stack, u.layer)].append(u)
    cats = [c for c in (*CATEGORIES, KEEP, FREEZE) if any(u.category == c for u in plan.units)]
    in_stacks = {u.category for u in plan.units if u.stack is not None}
    cats += sorted(c for c in in_stacks if c is not None and c not in cats)  # (never None in a stack)
    rows = []
    for (stack, layer), units in sorted(layer_units.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        cells = [f"{stack}.{layer}" if len(plan.stacks) > 1 else str(layer)]
        for c in cats:
            cu = [u for u in units if u.category == c]
            if not cu:
                cells.append("-")
                continue
            on = [u for u in cu if _state(plan, u) != "no"]
            if plan.strategy == "parameter" and c not in (KEEP, FREEZE):
                cells.append(f"{plan.ratio:g} of entries")
                continue
            prefix = _common_prefix([u.rel for u in cu])
            shown = [u.rel[len(prefix) :] or u.rel for u in on]
            text = " ".join(shown) if len(cu) <= 8 else ""
            cells.append(f"{text} {len(on)}/{len(cu)}".strip())
        tot = sum(u.numel for u in units)
        cells.append(f"{sum(_trained_share(plan, u) for u in units) / tot:.2%}" if tot else "-")
        rows.append(cells)
    return [*_table(["layer", *cats, "trainable"], rows), ""] if rows else []


def _totals_table(plan: PlanView) -> list[str]:
    """Per category, the layers, outside the layers and overall: units and parameters trained."""
    c = plan.counts()
    approx = "~" if plan.entry_masked else ""
    rows = []
    for cat, (t, n) in c["categories"].items():
        cu = [u for u in plan.units if u.stack is not None and u.category == cat]
        on = sum(1 for u in cu if _state(plan, u) != "no")
        rows.append([cat, f"{on}/{len(cu)}", f"{approx}{_num(t)} / {n}", f"{approx}{_pct(t, n)}"])
    t, n = c["layers"]
    rows.append(["layers (all)", "", f"{approx}{_num(t)} / {n}", f"{approx}{_pct(t, n)}"])
    outside = [u for u in plan.units if u.stack is None]
    if outside:
        t2, n2 = c["outside"]
        rows.append(
            [
                "outside layers",
                f"{sum(1 for u in outside if _state(plan, u) != 'no')}/{len(outside)}",
                f"{_num(t2)} / {n2}",
                _pct(t2, n2),
            ]
        )
    t3, n3 = c["all"]
    rows.append(["all parameters", "", f"{approx}{_num(t3)} / {n3}", f"{approx}{_pct(t3, n3)}"])
    lines = _table(["category", "units", "trainable / total params", "fraction"], rows)
    if outside:
        names = ", ".join(u.rel for u in outside[:4]) + (" ..." if len(outside) > 4 else "")
        lines.append(f"outside layers: {names}")
    return lines


def summary(plan: PlanView) -> str:
    """A text table: per layer and category what trains, then exact trainable fractions.

    Args:
        plan: the plan to describe.
    """
    opts = plan.options
    lines = [
        f"HFT plan: strategy={plan.strategy} ratio={plan.ratio} seed={plan.seed} round={plan.round}"
        f" balance={opts['balance']} freeze_non_layer={opts['freeze_non_layer']}"
    ]
    if not plan.stacks:
        lines.append("no transformer layer stack found: every parameter counts as a layer parameter")
    for stack, n_layers in plan.stacks.items():
        lines.append(f"layer stack {stack!r}: {n_layers} layers")
    lines.append("")
    return "\n".join(lines + _layer_table(plan) + _totals_table(plan))
