#!/usr/bin/env python
"""Forgetting benchmark: fine-tune a pre-trained byte-level Llama on English, measure what it forgets.

    python benchmarks/forgetting.py                 # the default demo (see docs/forgetting.md for its time)
    python benchmarks/forgetting.py --quick         # smoke test (< 1 min)
    python benchmarks/forgetting.py --full          # everything behind docs/forgetting.md, one size
    python benchmarks/forgetting.py --pretrain --size large   # rebuild a shipped checkpoint
    python benchmarks/forgetting.py --merge out/s0,out/s1     # one report from runs split over seeds
    python benchmarks/forgetting.py --size-axis out/full-micro,out/full-tiny,out/full-cpu,out/full-large

1. The pre-trained checkpoint theta0 of ``--size`` comes from ``benchmarks/checkpoints/``
   (trained on the Python standard library's sources until the held-out code loss plateaued;
   ``--pretrain`` rebuilds it, see ``_forgetting_pretrain.py``).
2. Fine-tuning on the English text of ``pydoc_data/topics.py``: every method, lr and seed
   trains from theta0 until the held-out English loss stops improving and is measured at its
   best point: learning (held-out English loss), forgetting (rise of the held-out code loss),
   KL to theta0 on held-out English, ||theta - theta0|| and the fraction of entries moved. The
   methods are the optimizers (AdamW, HalfAdam, MoFO, RandomBCD) and their peers (LoRA, BAdam,
   LISA, and WiSE-FT interpolations of every AdamW run; ``_forgetting_peers.py``). Tables compare
   the optimizers at the same lr (the papers' protocol) and, with several lrs, at equal learning;
   with peers, every configuration against the WiSE-FT and AdamW curves at its own English loss
   and KL, the method that forgets least at common English losses, and rank correlations of
   forgetting with KL, distance and fraction moved (``_forgetting_tradeoff.py``); seeds give
   mean ± std and paired differences with 95 % intervals.
3. Continual learning: four tasks in sequence with OP and BWT in both papers' conventions.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
# Idle OpenMP threads sleep instead of spinning: on a shared machine, spinning threads that
# lose their core slow every parallel region down by an order of magnitude (measured: 2
# threads on 2 busy cores went from 0.2 to 3 s per step). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _forgetting_continual as continual  # noqa: E402
import _forgetting_data as data  # noqa: E402
import _forgetting_finetune as finetune  # noqa: E402
import _forgetting_models as models  # noqa: E402
import _forgetting_optimizers as optimizers  # noqa: E402
import _forgetting_report as report  # noqa: E402
import _forgetting_tables as tables  # noqa: E402
import torch  # noqa: E402
from _forgetting_progress import Progress  # noqa: E402

try:
    import maskopt  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class Preset:
    """What one invocation runs: fine-tuning sweep, continual sequence and their budgets."""

    optimizers: tuple[str, ...]
    lrs: tuple[float, ...]
    # LoRA's own lr sweep: adapters starting at zero need a larger lr than full fine-tuning
    lora_lrs: tuple[float, ...]
    seeds: int
    finetune: finetune.FinetuneBudget
    continual_optimizers: tuple[str, ...]
    continual_lr: float
    task_steps: int
    task_eval_windows: int
    note: str


_FULL_BUDGET = finetune.FinetuneBudget(
    batch=16,
    eval_every=25,
    patience=4,
    tolerance=0.002,
    max_steps=2000,
    warmup=20,
    english_windows=128,
    code_windows=128,
)
PRESETS = {
    "quick": Preset(
        optimizers=optimizers.OPTIMIZERS[:6]
        + (optimizers.WISE, "lora4", "badam-layer", "badam-ratio", "lisa"),
        lrs=(1e-3,),
        lora_lrs=(3e-3,),
        seeds=1,
        finetune=finetune.FinetuneBudget(
            batch=8,
            eval_every=5,
            patience=2,
            tolerance=0.002,
            max_steps=15,
            warmup=3,
            english_windows=16,
            code_windows=32,
        ),
        continual_optimizers=("adamw", "halfadam", "mofo5", "rbcd5"),
        continual_lr=1e-3,
        task_steps=5,
        task_eval_windows=16,
        note="--quick: a smoke test on a tiny budget; its numbers mean nothing",
    ),
    "demo": Preset(
        optimizers=("adamw", optimizers.WISE, "mofo15", "lora16"),
        lrs=(1e-3,),
        lora_lrs=(3e-3,),
        seeds=1,
        finetune=_FULL_BUDGET,
        # no continual sequence by default: with LoRA and WiSE-FT the demo would pass its 10-minute
        # budget on one core (--continual-optimizers adamw,mofo5 adds it back: about 100 s)
        continual_optimizers=(),
        continual_lr=1e-3,
        task_steps=60,
        task_eval_windows=64,
        note="default demo: AdamW, its WiSE-FT interpolations, MoFO and LoRA r=16 (lr 3e-3), one "
        "lr, one seed (no spread), fine-tuning only (--continual-optimizers adamw,mofo5 adds the "
        "continual sequence); --full adds HalfAdam, BAdam, LISA, more LoRA ranks, 3 lrs, 3 seeds "
        "and the continual sequence, as in docs/forgetting.md",
    ),
    "full": Preset(
        optimizers=(
            "adamw",
            optimizers.WISE,
            "halfadam",
            "mofo15",
            "lora4",
            "lora16",
            "lora64",
            "badam-layer",
            "badam-ratio",
            "lisa",
        ),
        lrs=(3e-4, 1e-3, 3e-3),
        lora_lrs=(1e-3, 3e-3, 1e-2),
        seeds=3,
        finetune=_FULL_BUDGET,
        continual_optimizers=("adamw", "halfadam", "mofo5"),
        continual_lr=1e-3,
        task_steps=60,
        task_eval_windows=64,
        note="--full: 3 lrs (LoRA: its own 3) x 3 seeds behind docs/forgetting.md (its ablation "
        "tables add --optimizers mofo15-grad,rbcd15,mofo5 --lr 1e-3, merged with --merge)",
    ),
}


def default_threads() -> int:
    """All cores, less the ones other processes keep busy (1-minute load average)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):
        busy = 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


# --------------------------------------------------------------------------------------------
# CLI values


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _lrs(s: str) -> list[float]:
    out = []
    for part in s.split(","):
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a learning rate or a comma-separated list, got {s!r}"
            ) from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"learning rates must be finite and > 0, got {part!r}")
        out.append(v)
    return out


def _names_from(known: tuple[str, ...]):
    def parse(s: str) -> list[str]:
        names = [p.strip().lower() for p in s.split(",") if p.strip()]
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer(s) {bad or s!r}; choose from {', '.join(known)}"
            )
        return names

    return parse


_names = _names_from(optimizers.KNOWN)
_continual_names = _names_from(optimizers.OPTIMIZERS)


def _dirs(s: str) -> list[Path]:
    return [Path(p) for p in s.split(",") if p.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Forgetting benchmark: fine-tune a pre-trained byte-level Llama on English with "
        "AdamW / HalfAdam / MoFO / RandomBCD until it stops improving; measure learning "
        "and forgetting over seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_true", help="smoke test on a tiny budget (< 1 min)")
    budget.add_argument(
        "--full",
        action="store_true",
        help="every method, 3 lrs and 3 seeds behind docs/forgetting.md: 81 fine-tuning runs of 2-4 min "
        "each at --size cpu on one core; --optimizers and --lr select a slice",
    )
    p.add_argument(
        "--size",
        choices=sorted(models.SIZES),
        default=models.DEFAULT_SIZE,
        help="model size; its checkpoint is benchmarks/checkpoints/SIZE.pt",
    )
    p.add_argument(
        "--pretrain",
        action="store_true",
        help="pre-train --size until its held-out code loss plateaus and write its checkpoint",
    )
    p.add_argument(
        "--size-axis",
        type=_dirs,
        default=None,
        metavar="DIR,DIR,...",
        help="only report: the forgetting gap against model size from the finetune.csv of "
        "earlier --full runs (one output directory per size)",
    )
    p.add_argument(
        "--merge",
        type=_dirs,
        default=None,
        metavar="DIR,DIR,...",
        help="only report: combine the fine-tuning runs (finetune.csv) of earlier runs of one "
        "size, e.g. seeds or optimizers run in parallel, into the tables, CSV and plot in --out",
    )
    p.add_argument(
        "--mode", choices=["all", "finetune", "continual"], default="all", help="which experiments to run"
    )
    p.add_argument(
        "--lr",
        type=_lrs,
        default=None,
        help="fine-tuning lr for every method, LoRA included; a comma-separated list runs a sweep "
        "and the equal-learning comparison (default: the preset's, and LoRA's own sweep)",
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help="number of seeds (0..N-1 after --seed) (default: the preset's)",
    )
    p.add_argument("--seed", type=_nonneg_int, default=0, help="first seed")
    p.add_argument(
        "--optimizers",
        type=_names,
        default=None,
        help="comma-separated fine-tuning methods: optimizers, LoRA ranks, BAdam modes, LISA, and "
        "wiseft (WiSE-FT interpolations of every AdamW run) (default: the preset's)",
    )
    p.add_argument(
        "--continual-optimizers",
        type=_continual_names,
        default=None,
        help="comma-separated continual-learning optimizers (default: the preset's)",
    )
    p.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help="fine-tuning: cap on steps per run; early stopping normally ends it sooner",
    )
    p.add_argument(
        "--task-steps",
        type=_positive_int,
        default=None,
        help="continual learning: steps per task (default: the preset's)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for torch (default: the cores not busy with other work)",
    )
    p.add_argument("--out", default=str(HERE / "out"), help="output directory (CSV, PNG)")
    p.add_argument(
        "--checkpoints", default=str(models.CHECKPOINT_DIR), help="directory of the pre-trained checkpoints"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (for CI logs)")
    args = p.parse_args(argv)
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    dev = "cpu" if dev == "auto" else dev
    try:
        device = torch.device(dev)
    except RuntimeError as e:
        p.error(f"--device {args.device!r} is not a torch device ({e})")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu, cuda, cuda:N or auto, got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error(
                f"--device {args.device} requested but CUDA is not available in this torch "
                f"({torch.__version__})"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    args.device = device
    if sum(map(bool, (args.pretrain, args.size_axis, args.merge))) > 1 or (
        (args.pretrain or args.size_axis or args.merge) and (args.quick or args.full)
    ):
        p.error(
            "--pretrain, --size-axis and --merge each do one thing only; they conflict with each "
            "other and with --quick and --full"
        )
    args.preset = "quick" if args.quick else "full" if args.full else "demo"
    return args


# --------------------------------------------------------------------------------------------
# Runs


def versions_line() -> str:
    import transformers

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {platform.machine()} {platform.system()}"
    )


def run_size_axis(args) -> int:
    per_size = {}
    for d in args.size_axis:
        try:
            ref, rows = report.read_finetune_csv(d / "finetune.csv")
        except ValueError as e:
            raise SystemExit(f"--size-axis: {e}") from None
        size = ref["size"]
        per_size[size] = (ref, rows, models.parameter_count(models.SIZES[size]))
    per_size = dict(sorted(per_size.items(), key=lambda kv: kv[1][2]))
    fixed_lr = args.lr[0] if args.lr else PRESETS["demo"].lrs[0]
    axis = report.size_axis_rows(per_size, fixed_lr)
    print(
        "Forgetting gap against AdamW by model size (Δ forgetting, nats/byte; negative = forgets "
        "less than AdamW); " + report.DIFF_NOTE
    )
    print(report.size_axis_table(axis))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.plot_size_axis(out / "size_axis.png", axis, versions_line())
    recipes = [models.load_recipe(size, Path(args.checkpoints)) for size in per_size]
    print("\nThe pre-trained checkpoints")
    print(report.checkpoint_table(recipes))
    report.plot_pretraining(out / "pretraining.png", recipes, versions_line())
    print(f"\nwrote {out / 'size_axis.png'}, {out / 'pretraining.png'}")
    return 0


def run_merge(args) -> int:
    """Combine the fine-tuning runs of several output directories (seeds, lrs or optimizers run
    in parallel, or added later) into one set of tables, CSV files and plot in --out."""
    try:
        ref, rows = report.merge_finetune_csvs([d / "finetune.csv" for d in args.merge])
    except ValueError as e:
        raise SystemExit(f"--merge: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dirs = ", ".join(str(d) for d in args.merge)
    print(
        f"# merged from {dirs}: size {ref['size']}, {len(rows)} runs, seeds "
        f"{', '.join(str(s) for s in sorted({r['seed'] for r in rows}))}"
    )
    tables.print_finetune_tables(ref, rows)
    report.write_csv(out / "finetune.csv", [ref] + rows, report.FINETUNE_FIELDS)
    report.write_csv(out / "finetune_curves.csv", report.curve_rows(rows), report.CURVE_FIELDS)
    report.plot_results(
        out / "forgetting.png", tables.trained(rows), [], f"size {ref['size']}, merged from {dirs}"
    )
    extra = tables.write_tradeoff(
        out,
        ref,
        rows,
        f"size {ref['size']}: {len(rows)} runs and interpolations merged from {len(args.merge)} directories",
    )
    written = [out / "finetune.csv", out / "finetune_curves.csv", out / "forgetting.png"] + extra
    print(f"\nwrote {', '.join(str(f) for f in written)}")
    return 0


def run_benchmark(args) -> int:
    preset = PRESETS[args.preset]
    names = args.optimizers or list(preset.optimizers)
    cl_names = args.continual_optimizers or list(preset.continual_optimizers)
    lrs = args.lr or list(preset.lrs)
    lrs_of = {n: (args.lr or list(preset.lora_lrs if n.startswith("lora") else preset.lrs)) for n in names}
    seeds = list(range(args.seed, args.seed + (args.seeds or preset.seeds)))
    budget = preset.finetune
    if args.max_steps:
        budget = dataclasses.replace(budget, max_steps=args.max_steps)
    task_steps = args.task_steps or preset.task_steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(args.quiet)
    t_all = time.perf_counter()

    corpora = data.load_corpora()
    model, recipe = models.load_checkpoint(args.size, Path(args.checkpoints))
    model = model.to(args.device)
    shape = models.SIZES[args.size]
    n_params = sum(p.numel() for p in model.parameters())
    setting = (
        f"size {args.size}: Llama {shape.layers} layers x {shape.hidden} hidden, {n_params / 1e6:.2f} M "
        f"parameters, seq {shape.seq}; seeds {seeds[0]}..{seeds[-1]}; device {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    progress.say(f"forgetting benchmark -- {setting}\n  {versions_line()}\n  {preset.note}")
    progress.say(
        f"  checkpoint {args.size}.pt (sha256 {recipe['sha256'][:12]}...): pre-trained "
        f"{recipe['steps_run']} steps, held-out code loss {recipe['held_out_code_loss']:.3f} "
        f"on Python {recipe['python']}"
    )
    note = models.corpus_note(recipe, corpora["code"].digest)
    if note:
        progress.say("  " + note)

    ref, ft_rows = None, []
    if args.mode in ("all", "finetune"):
        progress.say(
            f"fine-tuning on English until the held-out loss stops improving (at most "
            f"{budget.max_steps} steps, evaluated every {budget.eval_every}, patience "
            f"{budget.patience}): {', '.join(names)}; lr {', '.join(f'{x:g}' for x in lrs)}"
            + (
                f" (LoRA: {', '.join(f'{x:g}' for x in preset.lora_lrs)})"
                if not args.lr and any(n.startswith("lora") for n in names)
                else ""
            )
        )
        ref, ft_rows = finetune.finetune_sweep(
            model, corpora, names, lrs_of, seeds, shape.seq, budget, args.device, progress, args.size
        )
        report.write_csv(out / "finetune.csv", [ref] + ft_rows, report.FINETUNE_FIELDS)
        report.write_csv(out / "finetune_curves.csv", report.curve_rows(ft_rows), report.CURVE_FIELDS)
    cl_rows, cells = [], []
    if args.mode in ("all", "continual") and cl_names:
        progress.say(
            f"continual learning: {' -> '.join(data.CONTINUAL_TASKS)}, {task_steps} steps per "
            f"task, lr {preset.continual_lr:g}: {', '.join(cl_names)}"
        )
        cl_rows, cells = continual.continual_all(
            model,
            corpora,
            cl_names,
            preset.continual_lr,
            seeds,
            shape.seq,
            budget.batch,
            task_steps,
            preset.task_eval_windows,
            args.device,
            progress,
        )
        report.write_csv(out / "continual.csv", cl_rows, report.CONTINUAL_FIELDS)
        report.write_csv(out / "continual_matrix.csv", cells, report.MATRIX_FIELDS)

    print()
    print(
        f"# {setting}\n# {versions_line()}\n# {preset.note}\n"
        f"# total wall time {time.perf_counter() - t_all:.0f} s"
    )
    if ft_rows:
        tables.print_finetune_tables(ref, ft_rows)
    if cl_rows:
        print(
            f"\nContinual learning ({' -> '.join(data.CONTINUAL_TASKS)}, {task_steps} steps per task, lr "
            f"{preset.continual_lr:g}); OP/BWT in points of held-out next-byte accuracy, BWT (loss) in "
            f"nats/byte (negative = forgot); {report.SPREAD_NOTE}"
        )
        print(report.continual_table(cl_rows))
        if "adamw" in cl_names and len(cl_names) > 1:
            print(f"\nAgainst AdamW, {report.DIFF_NOTE}")
            print(report.continual_paired_table(cl_rows))
    written = ([out / "finetune.csv"] if ft_rows else []) + (
        [out / "continual.csv", out / "continual_matrix.csv"] if cl_rows else []
    )
    if ft_rows or cl_rows:
        report.plot_results(
            out / "forgetting.png", tables.trained(ft_rows), cl_rows, f"{setting}\n{versions_line()}"
        )
        written.append(out / "forgetting.png")
    if ft_rows:
        written += tables.write_tradeoff(out, ref, ft_rows, f"{setting}\n{versions_line()}")
    if written:
        print(f"\nwrote {', '.join(str(f) for f in written)}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or default_threads())
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.size_axis:
        return run_size_axis(args)
    if args.merge:
        return run_merge(args)
    if args.pretrain:
        import _forgetting_pretrain

        _forgetting_pretrain.pretrain(
            args.size,
            data.load_corpora(),
            args.device,
            Progress(args.quiet),
            Path(args.checkpoints),
            torch.get_num_threads(),
        )
        return 0
    try:
        return run_benchmark(args)
    except models.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
