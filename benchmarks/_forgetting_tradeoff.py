"""Learning-forgetting trade-off curves across methods, matched comparisons and rank correlations.

A *configuration* is one method at one knob setting and lr (``mofo15`` at lr 1e-3, ``lora16``
at 3e-3, ``wiseft40`` of the AdamW run at 1e-3); its seeds are its runs. A *family* is a
method across its knob (``_forgetting_optimizers.family``). A family's curve is made of the
configurations on the Pareto front of their seed means in (held-out English loss, forgetting):
choosing them by the mean, not per seed, keeps the noise of one seed from picking its own best
points. WiSE-FT's family also holds theta0 (lambda = 0) and the AdamW runs (lambda = 1).

For a seed, the curve joins that seed's runs of the front configurations by straight lines,
ordered by the matching quantity (English loss for equal learning, KL to theta0 for equal
KL). A configuration is compared with a reference family (WiSE-FT of AdamW, or AdamW's lr
sweep) by reading the reference's curve of the same seed at the configuration's own English
loss (or KL): paired by seed, as in the rest of the benchmark, and n/a where a seed's value
lies outside the reference curve.
"""

from __future__ import annotations

import math

import _forgetting_optimizers as optimizers
import _forgetting_stats as st
import numpy as np

THETA0 = "theta0"
REFERENCES = (optimizers.WISE, "adamw")
CORRELATES = (("kl", "KL to θ0 (English)"), ("dist", "‖θ−θ0‖"), ("moved", "entries moved"))


def _key(row: dict) -> tuple[str, float]:
    return row["optimizer"], row["lr"]


def family_runs(rows: list[dict], ref: dict, fam: str) -> dict[tuple[str, float], dict[int, dict]]:
    """(name, lr) -> seed -> run, for the configurations of ``fam``; WiSE-FT's include theta0 and AdamW."""
    seeds = sorted({r["seed"] for r in rows})
    members = {fam, "adamw"} if fam == optimizers.WISE else {fam}
    out: dict[tuple[str, float], dict[int, dict]] = {}
    for r in rows:
        if optimizers.family(r["optimizer"]) in members:
            out.setdefault(_key(r), {})[r["seed"]] = r
    if fam == optimizers.WISE and out:
        start = dict(ft_loss=ref["ft_loss"], forgetting=0.0, kl=0.0, dist=0.0, moved=0.0)
        out[(THETA0, 0.0)] = {s: dict(start, optimizer=THETA0, lr=0.0, seed=s) for s in seeds}
    return out


def _mean(runs: dict[int, dict], key: str) -> float:
    return st.summarize([r[key] for r in runs.values()]).mean


def front(configs: dict[tuple[str, float], dict[int, dict]]) -> list[tuple[str, float]]:
    """The configurations no other one beats in both mean English loss and mean forgetting."""
    means = {k: (_mean(v, "ft_loss"), _mean(v, "forgetting")) for k, v in configs.items()}
    keep = [
        k
        for k, (x, y) in means.items()
        if not any(ox <= x and oy <= y and (ox, oy) != (x, y) for ox, oy in means.values())
    ]
    return sorted(keep, key=lambda k: means[k][0])


def kl_front(configs: dict[tuple[str, float], dict[int, dict]]) -> list[tuple[str, float]]:
    """The lower envelope of forgetting over KL: the configurations no other one beats with at
    least as much KL and no more forgetting. The equal-KL reading uses it rather than
    :func:`front`, whose points end where a configuration is beaten in English loss and
    forgetting (WiSE-FT at lambda = 0.8 can beat the AdamW run it interpolates in both) although
    the curve of forgetting over KL goes on to it."""
    means = {k: (_mean(v, "kl"), _mean(v, "forgetting")) for k, v in configs.items()}
    keep = [
        k
        for k, (x, y) in means.items()
        if math.isfinite(x)
        and not any(ox >= x and oy <= y and (ox, oy) != (x, y) for ox, oy in means.values())
    ]
    return sorted(keep, key=lambda k: means[k][0])


def curve_value(
    configs: dict, keys: list[tuple[str, float]], seed: int, level: float, x: str = "ft_loss"
) -> float | None:
    """Forgetting on the curve of ``keys`` at ``x`` = ``level`` for one seed; None outside it."""
    pts = sorted(
        (configs[k][seed][x], configs[k][seed]["forgetting"])
        for k in keys
        if seed in configs[k] and math.isfinite(configs[k][seed][x])
    )
    return st.interpolate(pts, level) if pts else None


class Curves:
    """Every family's configurations and front in one set of runs."""

    def __init__(self, rows: list[dict], ref: dict):
        self.rows = [r for r in rows if r["optimizer"] != THETA0]
        self.ref = ref
        self.seeds = sorted({r["seed"] for r in self.rows})
        names = dict.fromkeys(optimizers.family(r["optimizer"]) for r in self.rows)
        self.families = {f: family_runs(self.rows, ref, f) for f in names}
        self.fronts = {f: front(c) for f, c in self.families.items()}
        self.kl_fronts = {f: kl_front(c) for f, c in self.families.items()}

    def front_for(self, fam: str, x: str) -> list[tuple[str, float]]:
        """The configurations of ``fam``'s curve read at English loss (``x="ft_loss"``) or KL."""
        return self.kl_fronts[fam] if x == "kl" else self.fronts[fam]

    def curve_references(self) -> list[str]:
        """The reference families present with a curve (two configurations or more) to read."""
        return [f for f in REFERENCES if f in self.families and len(self.fronts[f]) > 1]

    def gaps(self, name: str, lr: float, against: str, x: str) -> list[float]:
        """Per seed: forgetting of (name, lr) minus ``against``'s curve at the run's own ``x``."""
        fam = optimizers.family(name)
        runs = self.families[fam][(name, lr)]
        configs = self.families[against]
        out = []
        for seed, r in sorted(runs.items()):
            if not math.isfinite(r[x]):
                continue
            other = curve_value(configs, self.front_for(against, x), seed, r[x], x)
            if other is not None:
                out.append(r["forgetting"] - other)
        return out

    def early_stopping_gaps(self, name: str, lr: float) -> list[float]:
        """Per seed: forgetting of (name, lr) minus AdamW's, both read along their training curves where
        they first reach the validation English loss the weaker of the two reaches at its best (the
        training-curve reading of the optimizer tables), AdamW at the same lr or else the nearest."""
        gaps = self.early_stopping_gap_by_seed(name, lr)
        return [gaps[s] for s in sorted(gaps)]

    def early_stopping_gap_by_seed(self, name: str, lr: float) -> dict[int, float]:
        adamw = {(r["lr"], r["seed"]): r for r in self.rows if r["optimizer"] == "adamw" and r.get("curve")}
        fam = optimizers.family(name)
        if not adamw or name in ("adamw", THETA0) or (name, lr) not in self.families.get(fam, {}):
            return {}
        base_lr = min({k[0] for k in adamw}, key=lambda x: abs(math.log(x / lr)))
        out = {}
        for seed, r in sorted(self.families[fam][(name, lr)].items()):
            base = adamw.get((base_lr, seed))
            if base is None or not r.get("curve"):
                continue
            level = max(
                min(c["english_val"] for c in r["curve"]), min(c["english_val"] for c in base["curve"])
            )
            mine, theirs = st.first_reach(r["curve"], level), st.first_reach(base["curve"], level)
            if mine is not None and theirs is not None:
                out[seed] = mine - theirs
        return out

    def configurations(self) -> list[tuple[str, str, float]]:
        """(family, name, lr) of every trained or interpolated configuration, in the rows' order."""
        seen = dict.fromkeys((optimizers.family(r["optimizer"]), r["optimizer"], r["lr"]) for r in self.rows)
        return list(seen)

    def levels(self, count: int = 4) -> list[float]:
        """English losses that at least two families' curves reach for every seed."""
        spans = []
        for f, configs in self.families.items():
            span = self._span(configs, self.fronts[f])
            if span:
                spans.append(span)
        overlaps = [
            (max(a[0], b[0]), min(a[1], b[1]))
            for i, a in enumerate(spans)
            for b in spans[i + 1 :]
            if max(a[0], b[0]) < min(a[1], b[1])
        ]
        if not overlaps:
            return []
        lo, hi = min(o[0] for o in overlaps), max(o[1] for o in overlaps)
        candidates = [lo + (hi - lo) * (i + 0.5) / count for i in range(count)]
        return [x for x in candidates if sum(a <= x <= b for a, b in spans) >= 2]

    def _span(self, configs, keys) -> tuple[float, float] | None:
        per_seed = []
        for s in self.seeds:
            xs = [configs[k][s]["ft_loss"] for k in keys if s in configs[k]]
            if not xs:
                return None
            per_seed.append((min(xs), max(xs)))
        lo, hi = max(p[0] for p in per_seed), min(p[1] for p in per_seed)
        return (lo, hi) if lo <= hi else None

    def at_level(self, fam: str, level: float) -> list[float] | None:
        """Forgetting of ``fam``'s curve at one English loss, one value per seed; None unless every seed reaches it."""
        values = [curve_value(self.families[fam], self.fronts[fam], s, level) for s in self.seeds]
        return None if any(v is None for v in values) else values


def _label(fam: str) -> str:
    return optimizers.FAMILY_LABELS.get(fam, fam)


def config_label(name: str, lr: float) -> str:
    if name == THETA0:
        return "θ0"
    return f"{optimizers.LABELS.get(name, name)}, lr {lr:g}"


def _gap_cell(gaps: list[float], seeds: int) -> str:
    if not gaps:
        return "n/a"
    s = st.summarize(gaps)
    text = s.fmt(signed=True, interval=True)
    if s.n < seeds:
        text += f" ({s.n} seed{'s' if s.n > 1 else ''})"
    elif s.n > 1 and s.excludes_zero():
        text += " less" if s.mean < 0 else " more"
    return text


def configuration_table(curves: Curves, fmt_table) -> str:
    """Every configuration: its means, and its forgetting minus each reference curve's, read at its
    own English loss and at its own KL (paired by seed, 95 % t interval; 'less'/'more' where resolved)."""
    refs = curves.curve_references()
    headers = ["configuration", "English loss", "forgetting", "KL", "‖θ−θ0‖", "moved"]
    for f in refs:
        headers += [f"Δ vs {_label(f)} at equal English", "at equal KL"]
    headers.append("Δ vs AdamW stopped early")
    body = []
    for fam, name, lr in curves.configurations():
        runs = list(curves.families[fam][(name, lr)].values())
        s = lambda key, runs=runs: st.summarize([r[key] for r in runs])  # noqa: E731
        cells = [
            config_label(name, lr),
            s("ft_loss").fmt(),
            s("forgetting").fmt(signed=True),
            s("kl").fmt(),
            s("dist").fmt(2),
            f"{100 * s('moved').mean:.0f} %",
        ]
        for f in refs:
            if fam == f or (f == optimizers.WISE and fam == "adamw"):
                cells += ["(its own curve)", ""]
                continue
            for x in ("ft_loss", "kl"):
                cells.append(_gap_cell(curves.gaps(name, lr, f, x), len(curves.seeds)))
        early = curves.early_stopping_gaps(name, lr)
        cells.append(_gap_cell(early, len(curves.seeds)) if early else "")
        body.append(cells)
    return fmt_table(headers, body)


def levels_table(curves: Curves, fmt_table) -> str | None:
    """At a few common English losses: every family's forgetting on its curve, the one that forgets
    least, and its paired difference with the runner-up."""
    levels = curves.levels()
    if not levels:
        return None
    values = {level: {f: curves.at_level(f, level) for f in curves.families} for level in levels}
    shown = [f for f in curves.families if any(values[level][f] for level in levels)]
    headers = ["English loss"] + [_label(f) for f in shown] + ["forgets least", "Δ to runner-up"]
    body = []
    for level in levels:
        reached = {f: v for f, v in values[level].items() if v is not None}
        cells = [f"{level:.3f}"]
        cells += [st.summarize(reached[f]).fmt(signed=True) if f in reached else "–" for f in shown]
        if len(reached) < 2:
            body.append(cells + ["–", "–"])
            continue
        order = sorted(reached, key=lambda f: st.summarize(reached[f]).mean)
        gap = st.summarize([a - b for a, b in zip(reached[order[0]], reached[order[1]], strict=True)])
        resolved = gap.n > 1 and gap.excludes_zero()
        cells += [
            _label(order[0]),
            f"{gap.fmt(signed=True, interval=True)} vs {_label(order[1])}"
            + ("" if resolved else " (not resolved)"),
        ]
        body.append(cells)
    return fmt_table(headers, body)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    def ranks(v):
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def rank_correlations(rows: list[dict], resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Spearman's rho of forgetting with KL, distance and fraction moved over the trained runs of every
    method and seed (WiSE-FT rows left out: they are functions of the AdamW runs), with a 95 %
    percentile bootstrap interval over runs."""
    runs = [r for r in rows if optimizers.family(r["optimizer"]) not in (optimizers.WISE, THETA0)]
    rng = np.random.default_rng(seed)
    out = []
    for key, label in CORRELATES:
        pairs = np.array(
            [
                (r[key], r["forgetting"])
                for r in runs
                if math.isfinite(r[key]) and math.isfinite(r["forgetting"])
            ]
        )
        if len(pairs) < 4:
            continue
        rho = spearman(pairs[:, 0], pairs[:, 1])
        boot = [spearman(*pairs[rng.integers(0, len(pairs), len(pairs))].T) for _ in range(resamples)]
        boot = np.array([b for b in boot if math.isfinite(b)])
        lo, hi = np.percentile(boot, [2.5, 97.5]) if len(boot) else (float("nan"), float("nan"))
        out.append(dict(measure=key, label=label, runs=len(pairs), rho=rho, lo=float(lo), hi=float(hi)))
    return out


def correlation_table(corr: list[dict], fmt_table) -> str:
    headers = ["forgetting against", "runs", "Spearman ρ", "95 % bootstrap interval"]
    body = [
        [c["label"], str(c["runs"]), f"{c['rho']:+.2f}", f"[{c['lo']:+.2f}, {c['hi']:+.2f}]"] for c in corr
    ]
    return fmt_table(headers, body)


TRADEOFF_FIELDS = (
    ["family", "optimizer", "lr", "seed", "ft_loss", "forgetting", "kl", "dist", "moved"]
    + [f"{ref}_forgetting_at_{x}" for ref in REFERENCES for x in ("ft_loss", "kl")]
    + ["minus_adamw_stopped_early"]
)


def tradeoff_rows(curves: Curves) -> list[dict]:
    """One CSV row per run (theta0 included for WiSE-FT), with each reference curve's forgetting read
    at the run's own English loss and KL, and the gap to AdamW stopped early: what the matched
    tables are made of."""
    out = []
    for fam, configs in curves.families.items():
        for (name, lr), runs in configs.items():
            early = curves.early_stopping_gap_by_seed(name, lr)
            for seed, r in sorted(runs.items()):
                row = dict(family=fam, optimizer=name, lr=lr, seed=seed)
                row.update({k: r[k] for k in ("ft_loss", "forgetting", "kl", "dist", "moved")})
                for ref in REFERENCES:
                    for x in ("ft_loss", "kl"):
                        value = None
                        if ref in curves.families and math.isfinite(r[x]):
                            value = curve_value(curves.families[ref], curves.front_for(ref, x), seed, r[x], x)
                        row[f"{ref}_forgetting_at_{x}"] = "" if value is None else value
                row["minus_adamw_stopped_early"] = early.get(seed, "")
                out.append(row)
    return out


def plot(path, curves: Curves, colors, title: str) -> None:
    """Forgetting against English loss (each configuration's mean ± std, fronts joined), against KL
    and against distance (every run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), dpi=90)
    ax = axes[0]
    ax.plot([curves.ref["ft_loss"]], [0.0], "k*", ms=9, label="θ0", zorder=4)
    for fam, configs in curves.families.items():
        color = colors(fam)
        pts = {}
        for key, runs in configs.items():
            if key[0] == THETA0 or (fam == optimizers.WISE and key[0] == "adamw"):
                continue
            sx, sy = (
                st.summarize([r["ft_loss"] for r in runs.values()]),
                st.summarize([r["forgetting"] for r in runs.values()]),
            )
            pts[key] = (sx.mean, sy.mean)
            ax.errorbar(
                sx.mean,
                sy.mean,
                xerr=sx.std if sx.n > 1 else 0,
                yerr=sy.std if sy.n > 1 else 0,
                color=color,
                marker="o" if fam != optimizers.WISE else ".",
                ms=4,
                lw=0.7,
                capsize=1.5,
                alpha=0.9,
                zorder=3,
            )
        line = [(_mean(configs[k], "ft_loss"), _mean(configs[k], "forgetting")) for k in curves.fronts[fam]]
        ax.plot(
            [p[0] for p in line],
            [p[1] for p in line],
            color=color,
            lw=1.3,
            ls="--" if fam == optimizers.WISE else "-",
            label=_label(fam),
            zorder=2,
        )
    ax.set_xlabel("held-out English loss (nats/byte)\n← learns more")
    ax.set_ylabel("forgetting: rise of the held-out code loss\n← forgets less")
    ax.set_title("trade-off: each method across its knob (line: its front)", fontsize=9)
    ax.legend(fontsize=7)
    for ax, key, xlabel in (
        (axes[1], "kl", "KL(fine-tuned ‖ θ0) on held-out English (nats/byte)"),
        (axes[2], "dist", "‖θ − θ0‖"),
    ):
        for fam, configs in curves.families.items():
            xs, ys = [], []
            for (name, _), runs in configs.items():
                if name == THETA0 or (fam == optimizers.WISE and name == "adamw"):
                    continue
                xs += [r[key] for r in runs.values()]
                ys += [r["forgetting"] for r in runs.values()]
            ax.scatter(xs, ys, s=12, color=colors(fam), alpha=0.8, label=_label(fam))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("forgetting")
        ax.set_title(f"forgetting against {xlabel.split(' (')[0].split(' on ')[0]}, every run", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    seeds = ", ".join(str(x) for x in curves.seeds)
    fig.suptitle(f"{title}\nseeds {seeds}; error bars: ± std over seeds", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def has_peers(rows: list[dict]) -> bool:
    """Whether the runs hold a comparison beyond the optimizers: WiSE-FT, LoRA, BAdam or LISA."""
    return any(optimizers.family(r["optimizer"]) not in optimizers.OPTIMIZER_FAMILIES for r in rows)


def print_tables(ref: dict, rows: list[dict], fmt_table, diff_note: str, spread_note: str) -> Curves:
    curves = Curves(rows, ref)
    print(
        "\nThe trade-off across methods: every configuration (method, knob, lr) at its best point, "
        f"{spread_note}; KL = KL(fine-tuned ‖ θ0) per byte on held-out English; Δ = its forgetting "
        "minus the reference curve's (WiSE-FT of AdamW over λ, or AdamW over its lrs), read at the "
        "run's own English loss or KL, or minus AdamW's (same seed, same or nearest lr) along both "
        "training curves where they first reach the validation English loss the weaker one reaches; "
        f"{diff_note}; 'less'/'more' where the interval excludes 0"
    )
    print(configuration_table(curves, fmt_table))
    table = levels_table(curves, fmt_table)
    if table:
        print(
            "\nWhich method forgets least at matched learning: each family's curve (its front over its "
            f"knob) read at common English losses; {spread_note}; Δ to the runner-up {diff_note}"
        )
        print(table)
    corr = rank_correlations(rows)
    if corr:
        print(
            "\nDoes forgetting follow the distance from θ0? Spearman's ρ over every trained run (all "
            "methods, lrs and seeds; WiSE-FT left out), 95 % percentile bootstrap over runs"
        )
        print(correlation_table(corr, fmt_table))
    return curves
