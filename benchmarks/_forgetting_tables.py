"""The fine-tuning tables the forgetting benchmark prints, and its trade-off outputs."""

from __future__ import annotations

from pathlib import Path

import _forgetting_optimizers as optimizers
import _forgetting_report as report
import _forgetting_stats as stats
import _forgetting_tradeoff as tradeoff


def trained(rows: list[dict]) -> list[dict]:
    """The runs that trained: WiSE-FT rows, interpolations without a training curve, are read in the
    trade-off tables only."""
    return [r for r in rows if optimizers.family(r["optimizer"]) != optimizers.WISE]


def print_finetune_tables(ref: dict, ft_rows: list[dict]) -> None:
    """Every fine-tuning table: per lr, the papers' protocol and the paired differences; then the
    equal-learning readings (along the training curves, along the lr sweeps)."""
    all_rows, ft_rows = ft_rows, trained(ft_rows)
    names = list(dict.fromkeys(r["optimizer"] for r in ft_rows))
    lrs = sorted({r["lr"] for r in ft_rows})
    against_adamw = "adamw" in names and len(names) > 1
    print(
        "\nFine-tuning on English, each run at its best point; losses in nats/byte held out; "
        f"forgetting = rise of the held-out code loss; {report.SPREAD_NOTE}"
    )
    for lr in lrs:
        print(f"\nSame lr for every optimizer (the papers' protocol): lr {lr:g}")
        print(report.fixed_lr_table(ref, ft_rows, lr))
        at = {r["optimizer"] for r in ft_rows if r["lr"] == lr}
        if "adamw" in at and len(at) > 1:
            print(f"\nAgainst AdamW at lr {lr:g}, {report.DIFF_NOTE}")
            print(report.paired_fixed_lr_table(ft_rows, lr))
        ablation = [n for n in optimizers.ABLATIONS if n in at]
        if optimizers.ABLATION_BASELINE in at and ablation:
            print(
                f"\nThe MoFO paper's ablations at lr {lr:g}: the gradient filter, random selection and "
                f"another fraction against MoFO 15 %, {report.DIFF_NOTE}"
            )
            print(report.paired_fixed_lr_table(ft_rows, lr, optimizers.ABLATION_BASELINE, ablation))
    if against_adamw:
        print(
            "\nEqual learning along the training curves: each optimizer and AdamW (same lr and "
            "seed) read where they first reach the validation English loss the weaker of the two "
            f"reaches at its best; {report.DIFF_NOTE}"
        )
        print(report.trajectory_gap_table(ft_rows))
    ablation = [n for n in optimizers.ABLATIONS if n in names]
    if optimizers.ABLATION_BASELINE in names and ablation:
        print(
            "\nThe ablations at equal learning along the training curves, against MoFO 15 %; "
            f"{report.DIFF_NOTE}"
        )
        print(report.trajectory_gap_table(ft_rows, optimizers.ABLATION_BASELINE, ablation))
    el = stats.equal_learning(ft_rows)
    if el:
        print(
            "\nEqual learning: forgetting read at common held-out English losses along each "
            f"optimizer's lr sweep (linear between runs); {report.SPREAD_NOTE}"
        )
        print(report.equal_learning_table(el, ft_rows))
    elif len(lrs) > 1:
        print(
            "\nEqual learning over all optimizers: n/a (their lr sweeps share no range of English "
            "loss for every seed)"
        )
    if len(lrs) > 1 and against_adamw:
        print(
            "\nAt equal learning, against AdamW (each pair read at the middle of the English "
            f"losses both sweeps reach for every seed), {report.DIFF_NOTE}"
        )
        print(report.equal_learning_gap_table(ft_rows))
    if tradeoff.has_peers(all_rows):
        tradeoff.print_tables(ref, all_rows, report.fmt_table, report.DIFF_NOTE, report.SPREAD_NOTE)


def write_tradeoff(out: Path, ref: dict, rows: list[dict], title: str) -> list[Path]:
    """tradeoff.csv and tradeoff.png, when the runs compare more than the optimizers."""
    if not tradeoff.has_peers(rows):
        return []
    curves = tradeoff.Curves(rows, ref)
    report.write_csv(out / "tradeoff.csv", tradeoff.tradeoff_rows(curves), tradeoff.TRADEOFF_FIELDS)
    tradeoff.plot(out / "tradeoff.png", curves, report.color_of, title)
    return [out / "tradeoff.csv", out / "tradeoff.png"]
