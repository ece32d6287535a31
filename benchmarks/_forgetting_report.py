"""Tables (markdown), CSV files and plots of the forgetting benchmark.

Spread conventions, said in every table's caption: single values are mean ± sample standard
deviation over seeds; differences against AdamW are paired by seed and given as mean ± the
half-width of their 95 % t interval. A verdict is only given where that interval excludes 0.
"""

from __future__ import annotations

import csv
import functools
import itertools
from pathlib import Path

import _forgetting_optimizers as optimizers
import _forgetting_stats as st

SPREAD_NOTE = "mean ± std over seeds"
DIFF_NOTE = "paired by seed, mean ± 95 % t-interval half-width"


def _summary_of(rows: list[dict], key: str) -> st.Summary:
    """The summary over rows (one per seed) of one column."""
    return st.summarize([r[key] for r in rows])


def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def _names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["optimizer"] for r in rows if r["optimizer"] != "theta0"))


def _label(rows: list[dict], name: str) -> str:
    return next(r["label"] for r in rows if r["optimizer"] == name)


def verdict(diff: st.Summary, less: str, more: str) -> str:
    if diff.n < 2:
        return "one seed: no verdict"
    if not diff.excludes_zero():
        return "not resolved"
    return less if diff.mean < 0 else more


def fixed_lr_table(ref: dict, rows: list[dict], lr: float) -> str:
    """The papers' protocol: every optimizer at the same lr, evaluated at its best point."""
    at = [r for r in rows if r["lr"] == lr]
    headers = [
        "optimizer",
        "seeds",
        "English loss",
        "learned",
        "forgetting",
        "‖θ−θ0‖",
        "entries moved",
        "best step",
        "ms/step",
    ]
    body = [
        ["pre-trained", "", f"{ref['ft_loss']:.3f}", "", f"(code {ref['code_loss']:.3f})", "", "", "", ""]
    ]
    for name in _names(at):
        mine = [r for r in at if r["optimizer"] == name]
        s = functools.partial(_summary_of, mine)
        moved = st.summarize([100 * r["moved"] for r in mine])
        body.append(
            [
                _label(at, name),
                str(len(mine)),
                s("ft_loss").fmt(),
                s("learned").fmt(),
                s("forgetting").fmt(signed=True),
                s("dist").fmt(2),
                moved.fmt(1) + " %",
                s("best_step").fmt(0),
                f"{s('ms_step').mean:.0f}",
            ]
        )
    return fmt_table(headers, body)


def paired_fixed_lr_table(
    rows: list[dict], lr: float, baseline: str = "adamw", names: list[str] | None = None
) -> str:
    """Each optimizer (or each of ``names``) minus ``baseline`` at the same lr and seed:
    learning and forgetting."""
    at = [r for r in rows if r["lr"] == lr]
    base = _label(at, baseline)
    headers = [f"optimizer − {base}", "Δ learned", "Δ forgetting", "forgetting verdict"]
    body = []
    for name in names or _names(at):
        if name == baseline:
            continue
        dl = st.summarize(st.paired_differences(at, "learned", name, baseline))
        df = st.summarize(st.paired_differences(at, "forgetting", name, baseline))
        body.append(
            [
                _label(at, name),
                dl.fmt(signed=True, interval=True),
                df.fmt(signed=True, interval=True),
                verdict(df, "forgets less", "forgets more"),
            ]
        )
    return fmt_table(headers, body)


def equal_learning_table(el: st.EqualLearning, rows: list[dict]) -> str:
    mid = el.levels[len(el.levels) // 2]
    ref = el.distance.get("adamw", {}).get(mid)
    headers = (
        ["optimizer"]
        + [f"forgetting at English {x:.3f}" for x in el.levels]
        + [f"‖θ−θ0‖ at {mid:.3f}" + (" / AdamW's" if ref else "")]
    )
    body = []
    for name, by_level in el.forgetting.items():
        cells = [st.summarize(by_level[x]).fmt(signed=True) for x in el.levels]
        d = el.distance[name][mid]
        if ref:
            ratio = st.summarize([a / b for a, b in zip(d, ref, strict=True)])
            cells.append(ratio.fmt(2))
        else:
            cells.append(st.summarize(d).fmt(2))
        body.append([_label(rows, name)] + cells)
    return fmt_table(headers, body)


def equal_learning_gap_table(rows: list[dict]) -> str | None:
    """Each optimizer minus AdamW at one English loss that both sweeps reach for every seed."""
    headers = ["optimizer − AdamW", "at English loss", "Δ forgetting", "verdict"]
    body = []
    for name in _names(rows):
        if name == "adamw":
            continue
        pg = st.equal_learning_gap(rows, name)
        if pg is None:
            body.append([_label(rows, name), "n/a", "no common range", ""])
            continue
        gap = st.summarize(pg.gaps)
        body.append(
            [
                _label(rows, name),
                f"{pg.level:.3f}",
                gap.fmt(signed=True, interval=True),
                verdict(gap, "forgets less", "forgets more"),
            ]
        )
    return fmt_table(headers, body) if body else None


def trajectory_gap_table(rows: list[dict], baseline: str = "adamw", names: list[str] | None = None) -> str:
    """Each optimizer (or each of ``names``) minus ``baseline`` at the same lr and seed, both
    read along their training curves where they first reach the English loss the weaker one
    reaches at its best."""
    headers = [f"optimizer − {_label(rows, baseline)}", "lr", "Δ forgetting at equal learning", "verdict"]
    body = []
    for lr in sorted({r["lr"] for r in rows}):
        at = [r for r in rows if r["lr"] == lr]
        present = _names(at)
        for name in names or present:
            if name == baseline or name not in present or baseline not in present:
                continue
            gap = st.summarize(st.trajectory_gap(at, name, baseline))
            body.append(
                [
                    _label(at, name),
                    f"{lr:g}",
                    gap.fmt(signed=True, interval=True),
                    verdict(gap, "forgets less", "forgets more"),
                ]
            )
    return fmt_table(headers, body)


def continual_table(rows: list[dict]) -> str:
    headers = ["optimizer", "seeds", "OP (acc %)", "BWT (MoFO)", "BWT (HFT)", "BWT (loss)", "code forgetting"]
    body = []
    for name in _names(rows):
        mine = [r for r in rows if r["optimizer"] == name]
        s = functools.partial(_summary_of, mine)
        body.append(
            [
                _label(rows, name),
                str(len(mine)),
                s("OP").fmt(2),
                s("BWT").fmt(2, True),
                s("BWT_hft").fmt(2, True),
                s("BWT_loss").fmt(3, True),
                s("code_forgetting").fmt(3, True),
            ]
        )
    return fmt_table(headers, body)


def continual_paired_table(rows: list[dict]) -> str:
    headers = ["optimizer − AdamW", "Δ OP", "Δ BWT (MoFO)", "BWT verdict"]
    body = []
    for name in _names(rows):
        if name == "adamw":
            continue
        dop = st.summarize(st.paired_differences(rows, "OP", name))
        dbwt = st.summarize(st.paired_differences(rows, "BWT", name))
        # BWT is negative when the model forgot: a larger BWT means less forgetting.
        body.append(
            [
                _label(rows, name),
                dop.fmt(2, True, True),
                dbwt.fmt(2, True, True),
                verdict(dbwt, "forgets more", "forgets less"),
            ]
        )
    return fmt_table(headers, body)


def size_axis_rows(per_size: dict[str, tuple[dict, list[dict], int]], fixed_lr: float) -> list[dict]:
    """For each size and partial-update optimizer: its forgetting gap against AdamW at ``fixed_lr``
    (the papers' protocol), at equal learning along the lr sweep, and at equal learning along
    the training curves at ``fixed_lr``."""
    out = []
    for size, (ref, rows, params) in per_size.items():
        for name in ("mofo15", "mofo5", "halfadam"):
            if not any(r["optimizer"] == name for r in rows):
                continue
            fixed = st.summarize(st.paired_differences(rows, "forgetting", name, lr=fixed_lr))
            pg = st.equal_learning_gap(rows, name)
            at = [r for r in rows if r["lr"] == fixed_lr]
            along = st.summarize(st.trajectory_gap(at, name))
            out.append(
                dict(
                    size=size,
                    parameters=params,
                    code_loss=ref["code_loss"],
                    optimizer=name,
                    label=_label(rows, name),
                    fixed_lr=fixed_lr,
                    fixed=fixed,
                    equal=st.summarize(pg.gaps) if pg else None,
                    level=pg.level if pg else None,
                    along=along if along.n else None,
                )
            )
    return out


def size_axis_table(axis: list[dict]) -> str:
    headers = [
        "size",
        "parameters",
        "θ0 code loss",
        "optimizer − AdamW",
        "same lr",
        "equal learning (lr sweep)",
        "at English loss",
        "equal learning (training curve)",
    ]
    body = []
    for a in axis:
        body.append(
            [
                a["size"],
                f"{a['parameters'] / 1e6:.2f} M",
                f"{a['code_loss']:.3f}",
                a["label"],
                f"{a['fixed'].fmt(signed=True, interval=True)} (lr {a['fixed_lr']:g})",
                a["equal"].fmt(signed=True, interval=True) if a["equal"] else "n/a",
                f"{a['level']:.3f}" if a["level"] else "n/a",
                a["along"].fmt(signed=True, interval=True) if a["along"] else "n/a",
            ]
        )
    return fmt_table(headers, body)


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


FINETUNE_FIELDS = [
    "size",
    "optimizer",
    "label",
    "lr",
    "seed",
    "best_step",
    "steps",
    "stopped_by",
    "ft_loss",
    "ft_acc",
    "learned",
    "code_loss",
    "code_acc",
    "forgetting",
    "kl",
    "dist",
    "moved",
    "ms_step",
    "ms_opt",
    "wall_s",
]
CONTINUAL_FIELDS = [
    "optimizer",
    "label",
    "lr",
    "seed",
    "task_steps",
    "OP",
    "BWT",
    "BWT_hft",
    "OP_loss",
    "BWT_loss",
    "code_forgetting",
    "wall_s",
]
MATRIX_FIELDS = ["optimizer", "lr", "seed", "after_task", "trained", "eval_task", "loss", "acc"]
_NUMERIC = {
    "lr",
    "seed",
    "best_step",
    "steps",
    "ft_loss",
    "ft_acc",
    "learned",
    "code_loss",
    "code_acc",
    "forgetting",
    "kl",
    "dist",
    "moved",
    "ms_step",
    "ms_opt",
    "wall_s",
}


CURVE_FIELDS = ["optimizer", "lr", "seed", "step", "english_val", "forgetting"]


def curve_rows(rows: list[dict]) -> list[dict]:
    """One CSV row per evaluation of every run's training curve."""
    return [dict(optimizer=r["optimizer"], lr=r["lr"], seed=r["seed"], **c) for r in rows for c in r["curve"]]


def read_finetune_csv(path: Path) -> tuple[dict, list[dict]]:
    """(theta0's row, the runs with their curves) from the ``finetune.csv`` and
    ``finetune_curves.csv`` this module wrote; ValueError when ``path`` does not exist."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist (run --full --out {path.parent} first)")
    with open(path, newline="") as f:
        rows = [
            {k: (float(v) if k in _NUMERIC and v != "" else v) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]
    runs = [r for r in rows if r["optimizer"] != "theta0"]
    for r in runs:
        r["seed"] = int(r["seed"])
        r["curve"] = []
        # runs written before the KL column existed
        if not isinstance(r.get("kl"), float):
            r["kl"] = float("nan")
    by_key = {(r["optimizer"], r["lr"], r["seed"]): r for r in runs}
    curves = path.with_name("finetune_curves.csv")
    if curves.is_file():
        with open(curves, newline="") as f:
            for c in csv.DictReader(f):
                run = by_key.get((c["optimizer"], float(c["lr"]), int(c["seed"])))
                if run is not None:
                    run["curve"].append(
                        dict(
                            step=int(c["step"]),
                            english_val=float(c["english_val"]),
                            forgetting=float(c["forgetting"]),
                        )
                    )
    ref = next(r for r in rows if r["optimizer"] == "theta0")
    return ref, runs


def merge_finetune_csvs(paths: list[Path]) -> tuple[dict, list[dict]]:
    """(theta0's row, the runs) of several ``finetune.csv`` of one size and checkpoint.

    A run (optimizer, lr, seed) found in more than one file must have the same results in each
    (runs are deterministic for a seed and thread count) and is kept once; anything else that
    would mix incomparable runs raises ValueError naming the files.
    """
    ref, runs, source = None, {}, {}
    for path in paths:
        r0, rows = read_finetune_csv(path)
        if ref is None:
            ref, ref_path = r0, path
        elif (r0["size"], r0["ft_loss"], r0["code_loss"]) != (ref["size"], ref["ft_loss"], ref["code_loss"]):
            raise ValueError(
                f"{path} and {ref_path} start from different checkpoints (size "
                f"{r0['size']} vs {ref['size']}, or a different theta0)"
            )
        for r in rows:
            key = (r["optimizer"], r["lr"], r["seed"])
            old = runs.get(key)
            if old is not None and (old["ft_loss"], old["forgetting"]) != (r["ft_loss"], r["forgetting"]):
                raise ValueError(
                    f"{key[0]} at lr {key[1]:g}, seed {key[2]} differs between {source[key]} and {path}"
                )
            runs.setdefault(key, r)
            source.setdefault(key, path)
    if ref is None:
        raise ValueError("no directories given")
    order = {name: i for i, name in enumerate(dict.fromkeys(k[0] for k in runs))}
    return ref, [runs[k] for k in sorted(runs, key=lambda k: (k[1], order[k[0]], k[2]))]


COLORS = {
    "adamw": "C3",
    "halfadam": "C1",
    "mofo5": "C2",
    "mofo15": "C0",
    "mofo15-grad": "C4",
    "mofo5-grad": "C4",
    "rbcd15": "C7",
    "rbcd5": "C7",
    "mofo": "C0",
    "mofo-grad": "C4",
    "rbcd": "C7",
    "wiseft": "C5",
    "lora": "C9",
    "badam-layer": "C8",
    "badam-ratio": "C6",
    "lisa": "olive",
}


def color_of(name: str) -> str:
    return COLORS.get(name) or COLORS.get(optimizers.family(name), "k")


MARKERS = "os^Dv"


def _mean_points(rows: list[dict], name: str, x: str, y: str):
    """Per lr: (lr, mean x, std x, mean y, std y)."""
    out = []
    for lr in sorted({r["lr"] for r in rows if r["optimizer"] == name}):
        mine = [r for r in rows if r["optimizer"] == name and r["lr"] == lr]
        sx, sy = st.summarize([r[x] for r in mine]), st.summarize([r[y] for r in mine])
        out.append((lr, sx.mean, sx.std if sx.n > 1 else 0.0, sy.mean, sy.std if sy.n > 1 else 0.0))
    return out


def _panel(ax, rows, x, y, lrs):
    for name in _names(rows):
        pts = _mean_points(rows, name, x, y)
        color = color_of(name)
        if len(pts) > 1:
            ax.plot([p[1] for p in pts], [p[3] for p in pts], color=color, lw=1, alpha=0.6, zorder=2)
        for i, (lr, mx, sx, my, sy) in enumerate(pts):
            ax.errorbar(
                mx,
                my,
                xerr=sx,
                yerr=sy,
                color=color,
                marker=MARKERS[lrs.index(lr) % len(MARKERS)],
                ms=6,
                lw=0.8,
                capsize=2,
                zorder=3,
                label=_label(rows, name) if i == 0 else None,
            )


def plot_results(path: Path, ft_rows: list[dict], cl_rows: list[dict], title: str) -> None:
    """Forgetting vs learning, forgetting vs distance, continual OP vs BWT; error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (2 if ft_rows else 0) + (1 if cl_rows else 0)
    # At least 6.4 inches wide so that the two-line setting in the title fits above one panel.
    fig, axes = plt.subplots(1, panels, figsize=(max(6.4, 4.6 * panels), 4.3), dpi=90, squeeze=False)
    axes = list(axes[0])
    lrs = sorted({r["lr"] for r in ft_rows} | {r["lr"] for r in cl_rows})
    lr_note = "; lr " + ", ".join(f"{MARKERS[i % len(MARKERS)]} {lr:g}" for i, lr in enumerate(lrs))
    seeds = len({r["seed"] for r in ft_rows + cl_rows})
    if ft_rows:
        _panel(axes[0], ft_rows, "ft_loss", "forgetting", lrs)
        axes[0].set_xlabel("held-out English loss at the best point (nats/byte)\n← learns more")
        axes[0].set_ylabel("forgetting: Δ held-out code loss\n← forgets less")
        axes[0].set_title("forgetting vs learning" + lr_note, fontsize=9)
        axes[0].legend(fontsize=7, loc="best")
        _panel(axes[1], ft_rows, "dist", "forgetting", lrs)
        axes[1].set_xlabel("‖θ − θ0‖ at the best point")
        axes[1].set_ylabel("forgetting: Δ held-out code loss")
        axes[1].set_title("distance from the pre-trained model", fontsize=9)
    if cl_rows:
        ax = axes[-1]
        _panel(ax, cl_rows, "BWT", "OP", lrs)
        ax.set_xlabel("BWT (accuracy points, MoFO's definition)\nforgets less →")
        ax.set_ylabel("OP: mean final accuracy (%)")
        ax.set_title("continual learning, 4 tasks", fontsize=9)
        if not ft_rows:
            ax.legend(fontsize=7, loc="best")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\nerror bars: ± std over {seeds} seed(s)", fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_size_axis(path: Path, axis: list[dict], title: str) -> None:
    """Forgetting gap against AdamW vs parameters; error bars = 95 % t interval of the paired mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12.6, 4.0), dpi=90, sharex=True, sharey=True)
    fixed_lr = axis[0]["fixed_lr"] if axis else float("nan")
    for ax, key, name in (
        (axes[0], "fixed", f"at the same lr ({fixed_lr:g})"),
        (axes[1], "equal", "at equal learning (lr sweep)"),
        (axes[2], "along", f"at equal learning (training curve, lr {fixed_lr:g})"),
    ):
        for opt in dict.fromkeys(a["optimizer"] for a in axis):
            pts = [(a["parameters"], a[key]) for a in axis if a["optimizer"] == opt and a[key] is not None]
            if not pts:
                continue
            label = next(a["label"] for a in axis if a["optimizer"] == opt)
            ax.errorbar(
                [p[0] for p in pts],
                [p[1].mean for p in pts],
                yerr=[0 if p[1].n < 2 else p[1].half_width95 for p in pts],
                marker="o",
                capsize=3,
                color=COLORS.get(opt, "k"),
                label=f"{label} − AdamW",
            )
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(f"forgetting gap {name}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Δ forgetting vs AdamW (nats/byte)\n← forgets less than AdamW")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}\nerror bars: 95 % t interval of the mean paired difference", fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def checkpoint_table(recipes: list[dict]) -> str:
    headers = [
        "size",
        "parameters",
        "steps",
        "stopped by",
        "epochs of the code",
        "held-out code loss",
        "held-out English loss",
        "time (s)",
        "sha256",
    ]
    body = [
        [
            r["size"],
            f"{r['parameters'] / 1e6:.2f} M",
            str(r["steps_run"]),
            r["stopped_by"],
            f"{r['bytes_seen'] / r['train_bytes']:.1f} epochs",
            f"{r['held_out_code_loss']:.3f}",
            f"{r['held_out_english_loss']:.3f}",
            f"{r['seconds']:.0f}",
            r["sha256"][:12],
        ]
        for r in recipes
    ]
    return fmt_table(headers, body)


def plot_pretraining(path: Path, recipes: list[dict], title: str) -> None:
    """Held-out code loss against pre-training step, one line per size; lr drops marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=90)
    for i, r in enumerate(recipes):
        steps = [c[0] for c in r["curve"]][1:]
        losses = [c[2] for c in r["curve"]][1:]
        ax.plot(
            steps,
            losses,
            color=f"C{i}",
            lw=1.2,
            label=f"{r['size']} ({r['parameters'] / 1e6:.2f} M): {r['held_out_code_loss']:.3f}",
        )
        drops = [c[0] for a, c in itertools.pairwise(r["curve"]) if c[1] < a[1]]
        for d in drops:
            ax.axvline(d, color=f"C{i}", lw=0.6, ls=":")
    ax.set_xlabel("pre-training step (batch 16 x 128 bytes)")
    ax.set_ylabel("held-out code loss (nats/byte)")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.set_title("pre-training until the held-out loss plateaus\n(dotted: lr divided by 4)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
