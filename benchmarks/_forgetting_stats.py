"""Statistics over seeds: mean ± standard deviation, paired differences with a 95 % t interval,
and forgetting read at equal learning along each optimizer's lr sweep.

A seed fixes the fine-tuning data order and the random selections; theta0 is the same for all
seeds. Differences are paired: optimizer X and AdamW with the same seed (and lr) saw the same
batches in the same order, so their difference has less noise than either value.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond.
_T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t95(dof: int) -> float:
    if dof < 1:
        return float("nan")
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


@dataclasses.dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation (n - 1); nan for one value
    n: int

    @property
    def half_width95(self) -> float:
        """Half-width of the 95 % t interval of the mean; nan for one value."""
        return t95(self.n - 1) * self.std / math.sqrt(self.n) if self.n > 1 else float("nan")

    def excludes_zero(self) -> bool:
        return self.n > 1 and abs(self.mean) > self.half_width95

    def fmt(self, digits: int = 3, signed: bool = False, interval: bool = False) -> str:
        """``mean ± std`` (or ``± 95 % half-width`` with ``interval``); just the mean for one seed."""
        sign = "+" if signed else ""
        text = f"{self.mean:{sign}.{digits}f}"
        spread = self.half_width95 if interval else self.std
        if self.n > 1 and math.isfinite(spread):
            text += f" ± {spread:.{digits}f}"
        return text


def summarize(values: list[float]) -> Summary:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return Summary(float("nan"), float("nan"), 0)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return Summary(statistics.fmean(values), std, len(values))


def paired_differences(
    rows: list[dict], metric: str, name: str, baseline: str = "adamw", lr: float | None = None
) -> list[float]:
    """``row[metric]`` of ``name`` minus that of ``baseline``, for each (lr, seed) both ran."""
    base = {
        (r["lr"], r["seed"]): r[metric]
        for r in rows
        if r["optimizer"] == baseline and (lr is None or r["lr"] == lr)
    }
    return [
        r[metric] - base[(r["lr"], r["seed"])]
        for r in rows
        if r["optimizer"] == name and (r["lr"], r["seed"]) in base and (lr is None or r["lr"] == lr)
    ]


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear value at ``x`` of points sorted by their first coordinate; None outside."""
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(points) == 1 and points[0][0] == x:
        return points[0][1]
    return None


@dataclasses.dataclass
class EqualLearning:
    """Forgetting (and distance) of every optimizer and seed, read at common English losses."""

    levels: list[float]  # English losses inside every (optimizer, seed) sweep's range
    forgetting: dict[str, dict[float, list[float]]]  # optimizer -> level -> one value per seed
    distance: dict[str, dict[float, list[float]]]
    seeds: list[int]

    def gap(self, name: str, level: float, baseline: str = "adamw") -> list[float]:
        """Per-seed forgetting of ``name`` minus ``baseline``'s at one English loss."""
        return [
            a - b for a, b in zip(self.forgetting[name][level], self.forgetting[baseline][level], strict=True)
        ]


def _sweeps(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """(optimizer, seed) -> that seed's runs over the lrs, ordered by held-out English loss."""
    sweeps: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["optimizer"] != "theta0":
            sweeps.setdefault((r["optimizer"], r["seed"]), []).append(r)
    for v in sweeps.values():
        v.sort(key=lambda r: r["ft_loss"])
    return sweeps


@dataclasses.dataclass
class PairedGap:
    level: float  # the English loss both sweeps reach for every seed (middle of that range)
    gaps: list[float]  # per seed: forgetting of the optimizer minus the baseline's at `level`
    seeds: list[int]


def equal_learning_gap(rows: list[dict], name: str, baseline: str = "adamw") -> PairedGap | None:
    """Forgetting of ``name`` minus ``baseline``'s, both read at one English loss per seed.

    Only the two optimizers' sweeps have to reach the level, so a pair can be compared where
    the table over all optimizers has no common range. None without such a level.
    """
    sweeps = _sweeps(rows)
    seeds = sorted(s for (n, s) in sweeps if n == name and (baseline, s) in sweeps)
    pairs = [(sweeps[(name, s)], sweeps[(baseline, s)]) for s in seeds]
    if not pairs or any(len(a) < 2 or len(b) < 2 for a, b in pairs):
        return None
    lo = max(max(a[0]["ft_loss"], b[0]["ft_loss"]) for a, b in pairs)
    hi = min(min(a[-1]["ft_loss"], b[-1]["ft_loss"]) for a, b in pairs)
    if not lo < hi:
        return None
    level = (lo + hi) / 2
    curve = lambda v: [(r["ft_loss"], r["forgetting"]) for r in v]  # noqa: E731
    gaps = [interpolate(curve(a), level) - interpolate(curve(b), level) for a, b in pairs]
    return PairedGap(level=level, gaps=gaps, seeds=seeds)


def equal_learning(rows: list[dict], fractions=(0.25, 0.5, 0.75)) -> EqualLearning | None:
    """Read each (optimizer, seed) lr sweep at English losses that every sweep reaches.

    The sweep's runs, ordered by held-out English loss, are joined by straight lines. The levels
    lie at ``fractions`` of the range common to all sweeps; None when there is no such range
    (or fewer than two lrs).
    """
    runs = [r for r in rows if r["optimizer"] != "theta0"]
    names = list(dict.fromkeys(r["optimizer"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    if len({r["lr"] for r in runs}) < 2:
        return None
    sweeps = _sweeps(runs)
    if any(len(v) < 2 for v in sweeps.values()) or len(sweeps) != len(names) * len(seeds):
        return None
    lo = max(v[0]["ft_loss"] for v in sweeps.values())
    hi = min(v[-1]["ft_loss"] for v in sweeps.values())
    if not lo < hi:
        return None
    levels = [lo + (hi - lo) * f for f in fractions]
    forgetting = {n: {x: [] for x in levels} for n in names}
    dist = {n: {x: [] for x in levels} for n in names}
    for n in names:
        for s in seeds:
            v = sweeps[(n, s)]
            for x in levels:
                forgetting[n][x].append(interpolate([(r["ft_loss"], r["forgetting"]) for r in v], x))
                dist[n][x].append(interpolate([(r["ft_loss"], r["dist"]) for r in v], x))
    return EqualLearning(levels=levels, forgetting=forgetting, distance=dist, seeds=seeds)


def first_reach(curve: list[dict], level: float) -> float | None:
    """Forgetting when the validation English loss first falls to ``level`` (linear between evaluations)."""
    for a, b in itertools.pairwise(curve):
        if b["english_val"] <= level:
            if a["english_val"] == b["english_val"]:
                return b["forgetting"]
            t = (a["english_val"] - level) / (a["english_val"] - b["english_val"])
            return a["forgetting"] + min(1.0, max(0.0, t)) * (b["forgetting"] - a["forgetting"])
    return None


def trajectory_gap(rows: list[dict], name: str, baseline: str = "adamw") -> list[float]:
    """Per (lr, seed): forgetting of ``name`` minus ``baseline``'s, read along the training curves
    where each first reaches the validation English loss that the weaker of the two reaches at
    its best. This is equal learning by stopping the stronger learner early."""
    base = {(r["lr"], r["seed"]): r for r in rows if r["optimizer"] == baseline and r.get("curve")}
    out = []
    for r in rows:
        b = base.get((r["lr"], r["seed"]))
        if r["optimizer"] != name or b is None or not r.get("curve"):
            continue
        level = max(min(c["english_val"] for c in r["curve"]), min(c["english_val"] for c in b["curve"]))
        mine, theirs = first_reach(r["curve"], level), first_reach(b["curve"], level)
        if mine is not None and theirs is not None:
            out.append(mine - theirs)
    return out
