"""`benchmarks/forgetting.py --quick --seeds 2` end to end on a shipped checkpoint, and its refusals.

The runs use the smallest size (micro, 0.04 M parameters): they test the pipeline, not the
numbers, and the cpu size the demo loads would make them twenty times slower.
"""

import contextlib
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("maskopt")
pytest.importorskip("peft")
pytest.importorskip("badam")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "forgetting.py"
SIZE = "micro"
CHECKPOINTS = ROOT / "benchmarks" / "checkpoints"
FINETUNE = ["adamw", "halfadam", "mofo5", "mofo15", "mofo15-grad", "rbcd15"]
PEERS = ["lora4", "badam-layer", "badam-ratio", "lisa"]
WISE = ["wiseft20", "wiseft40", "wiseft60", "wiseft80"]
LABELS = ["AdamW", "HalfAdam (HFT)", "MoFO a=5%", "MoFO a=15%", "MoFO-grad a=15%", "RandomBCD a=15%"]
PEER_LABELS = ["LoRA r=4", "BAdam layer", "BAdam ratio 15%", "LISA 1 layer/20 steps"]
CONTINUAL = ["adamw", "halfadam", "mofo5", "rbcd5"]
TASKS = ["english", "codecs", "email", "asyncio"]


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def bench():
    """The script as a module: the report-only modes (--merge, --size-axis) and the refusals
    run in this process (a subprocess would spend most of its time importing torch)."""
    return _load_module()


def _run_here(bench, *args):
    """``main(args)`` in this process: (exit code, stdout, stderr), as a subprocess reports them."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = bench.main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = _run("--quick", "--size", SIZE, "--seeds", "2", "--quiet", "--threads", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_loads_the_shipped_checkpoint(quick):
    _, proc = quick
    recipe = json.loads((CHECKPOINTS / f"{SIZE}.json").read_text())
    assert f"sha256 {recipe['sha256'][:12]}" in proc.stdout
    assert f"pre-trained {recipe['steps_run']} steps" in proc.stdout


def test_tables_on_stdout(quick):
    _, proc = quick
    out = proc.stdout
    assert "Same lr for every optimizer" in out and "mean ± std over seeds" in out
    assert "paired by seed, mean ± 95 % t-interval half-width" in out
    for label in LABELS + PEER_LABELS:
        assert f"| {label}" in out, label
    tradeoff = out[out.index("The trade-off across methods") :]
    for label in LABELS + PEER_LABELS + ["WiSE-FT λ=0.2", "WiSE-FT λ=0.8"]:
        assert f"| {label}, lr " in tradeoff, label
    assert "Spearman" in tradeoff and "| KL to θ0 (English) |" in tradeoff
    ablation = out[out.index("The MoFO paper's ablations at lr 0.001") :]
    assert "| optimizer − MoFO a=15% |" in ablation
    for label in ("MoFO-grad a=15%", "RandomBCD a=15%", "MoFO a=5%"):
        assert f"| {label}" in ablation, label
    assert "The ablations at equal learning along the training curves" in out
    assert "OP (acc %)" in out and "BWT (MoFO)" in out and "BWT (HFT)" in out
    assert "smoke test" in out  # the preset says what it is
    assert "step/s" not in proc.stderr  # --quiet: no progress bars


def test_finetune_csv_has_every_optimizer_and_seed(quick):
    out, _ = quick
    rows = _rows(out / "finetune.csv")
    assert rows[0]["optimizer"] == "theta0"
    runs = rows[1:]
    assert sorted((r["optimizer"], r["seed"]) for r in runs) == sorted(
        (n, s) for n in FINETUNE + PEERS + WISE for s in ("0", "1")
    )
    base = {k: float(rows[0][k]) for k in ("ft_loss", "code_loss")}
    # the shipped checkpoint knows code much better than English
    assert base["code_loss"] < base["ft_loss"] - 0.2
    for r in runs:
        for key in ("ft_loss", "code_loss", "forgetting", "kl", "dist", "moved", "best_step"):
            assert math.isfinite(float(r[key])), (r["optimizer"], key)
        assert float(r["learned"]) == pytest.approx(base["ft_loss"] - float(r["ft_loss"]), abs=1e-4)
        assert float(r["forgetting"]) == pytest.approx(float(r["code_loss"]) - base["code_loss"], abs=1e-4)
        assert 0 <= int(r["best_step"]) <= int(r["steps"])
        assert r["stopped_by"] in ("plateau", "max_steps", "interpolation")
    by = {(r["optimizer"], r["seed"]): r for r in runs}
    for s in ("0", "1"):
        assert float(by[("adamw", s)]["learned"]) > 0
        # MoFO 5 % moves far fewer entries than AdamW
        assert float(by[("mofo5", s)]["moved"]) < 0.5 * float(by[("adamw", s)]["moved"])
        # HalfAdam freezes half of the parameters; the runs after it (MoFO, then the next seed's
        # AdamW) must start with every parameter trainable again
        assert float(by[("adamw", s)]["moved"]) > 1.3 * float(by[("halfadam", s)]["moved"])
    # seeds change the data order, so the two AdamW runs differ
    assert by[("adamw", "0")]["ft_loss"] != by[("adamw", "1")]["ft_loss"]


def test_peers_and_wise_ft_rows(quick):
    out, _ = quick
    rows = _rows(out / "finetune.csv")[1:]
    by = {(r["optimizer"], r["seed"]): r for r in rows}
    for s in ("0", "1"):
        adamw = by[("adamw", s)]
        assert float(adamw["kl"]) > 0
        kls = []
        for name in WISE:
            r = by[(name, s)]
            lam = int(name[6:]) / 100
            # WiSE-FT interpolates the AdamW run's best point: same run, a fraction of its step
            assert r["best_step"] == adamw["best_step"] and r["stopped_by"] == "interpolation"
            assert float(r["dist"]) == pytest.approx(lam * float(adamw["dist"]), rel=1e-3)
            # (a change far below an entry's float32 spacing can round back to theta0 at a small lambda)
            assert float(r["moved"]) == pytest.approx(float(adamw["moved"]), rel=1e-3)
            kls.append(float(r["kl"]))
        assert kls == sorted(kls) and kls[-1] < float(adamw["kl"])
        # LoRA leaves the embedding, norms and head alone; BAdam the embedding and head
        for name in ("lora4", "badam-layer", "badam-ratio"):
            assert 0 < float(by[(name, s)]["moved"]) < float(adamw["moved"]), name
        assert float(by[("badam-ratio", s)]["moved"]) < 0.2
        assert float(by[("lora4", s)]["learned"]) > 0


def test_tradeoff_csv_and_png(quick):
    out, _ = quick
    rows = _rows(out / "tradeoff.csv")
    families = {r["family"] for r in rows}
    assert {"adamw", "wiseft", "lora", "badam-layer", "badam-ratio", "lisa", "mofo"} <= families
    lora = [r for r in rows if r["optimizer"] == "lora4"]
    assert len(lora) == 2 and all(r["wiseft_forgetting_at_kl"] != "" for r in lora)
    assert any(r["optimizer"] == "theta0" and float(r["forgetting"]) == 0 for r in rows)
    png = out / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_continual_csv_matches_metrics(quick):
    from maskopt.metrics import backward_transfer, overall_performance

    out, _ = quick
    rows = _rows(out / "continual.csv")
    assert sorted((r["optimizer"], r["seed"]) for r in rows) == sorted(
        (n, s) for n in CONTINUAL for s in ("0", "1")
    )
    cells = _rows(out / "continual_matrix.csv")
    for row in rows:
        R = [[None] * 4 for _ in range(4)]
        for c in cells:
            if c["optimizer"] == row["optimizer"] and c["seed"] == row["seed"] and c["eval_task"] in TASKS:
                R[int(c["after_task"]) - 1][TASKS.index(c["eval_task"])] = float(c["acc"])
        assert float(row["OP"]) == pytest.approx(overall_performance(R), abs=1e-4)
        assert float(row["BWT"]) == pytest.approx(backward_transfer(R), abs=1e-4)
        assert float(row["BWT_hft"]) == pytest.approx(backward_transfer(R, convention="hft"), abs=1e-4)


def test_png(quick):
    out, _ = quick
    png = out / "forgetting.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 400_000


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two lrs and two seeds of AdamW and MoFO on a tiny budget."""
    out = tmp_path_factory.mktemp("sweep")
    proc = _run(
        "--quick",
        "--size",
        SIZE,
        "--seeds",
        "2",
        "--lr",
        "1e-3,3e-3",
        "--mode",
        "finetune",
        "--optimizers",
        "adamw,mofo15",
        "--quiet",
        "--threads",
        "2",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_size_axis_report_from_a_sweep(sweep, bench, tmp_path):
    out, proc = sweep
    assert "At equal learning, against AdamW" in proc.stdout
    axis = _run_here(bench, "--size-axis", str(out), "--out", str(tmp_path / "axis"))
    assert axis.returncode == 0, axis.stdout[-3000:] + axis.stderr[-3000:]
    assert f"| {SIZE} " in axis.stdout and "MoFO a=15%" in axis.stdout
    assert (tmp_path / "axis" / "size_axis.png").stat().st_size > 1000


def _write_rows(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _split_by_seed(out, tmp_path):
    """The sweep's finetune.csv and curves, written as one directory per seed."""
    runs, curves = _rows(out / "finetune.csv"), _rows(out / "finetune_curves.csv")
    dirs = []
    for seed in ("0", "1"):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        for name, rows in (("finetune.csv", runs), ("finetune_curves.csv", curves)):
            _write_rows(d / name, [r for r in rows if r.get("optimizer") == "theta0" or r["seed"] == seed])
        dirs.append(d)
    return dirs


def _sorted_rows(path):
    return sorted(_rows(path), key=lambda r: (r["optimizer"], r["lr"], r["seed"]))


def _tables(stdout):
    return stdout[stdout.index("Fine-tuning on English") : stdout.index("wrote ")].strip()


def test_merge_of_runs_split_by_seed_gives_the_tables_of_the_whole_run(sweep, bench, tmp_path):
    out, proc = sweep
    dirs = _split_by_seed(out, tmp_path)
    merged = _run_here(bench, "--merge", ",".join(map(str, dirs)), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stdout[-3000:] + merged.stderr[-3000:]
    assert "seeds 0, 1" in merged.stdout
    # The CSV keeps 6 significant digits, so compare with the whole run read back from its CSV.
    whole = _run_here(bench, "--merge", str(out), "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert _tables(merged.stdout) == _tables(whole.stdout)
    assert "At equal learning, against AdamW" in merged.stdout
    assert _sorted_rows(tmp_path / "merged" / "finetune.csv") == _sorted_rows(out / "finetune.csv")
    assert (tmp_path / "merged" / "forgetting.png").stat().st_size > 1000
    # A run present in both directories is kept once when it agrees...
    again = _run_here(bench, "--merge", f"{out},{dirs[0]}", "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _sorted_rows(tmp_path / "again" / "finetune.csv") == _sorted_rows(out / "finetune.csv")


def test_merge_refuses_runs_that_disagree_or_come_from_another_checkpoint(sweep, bench, tmp_path):
    out, _ = sweep
    dirs = _split_by_seed(out, tmp_path)
    rows = _rows(dirs[0] / "finetune.csv")
    rows[1]["forgetting"] = str(float(rows[1]["forgetting"]) + 0.1)
    _write_rows(dirs[0] / "finetune.csv", rows)
    proc = _run_here(bench, "--merge", f"{out},{dirs[0]}", "--out", str(tmp_path / "bad"))
    assert proc.returncode != 0 and "differs between" in proc.stderr
    assert not (tmp_path / "bad" / "finetune.csv").exists()

    rows = _rows(dirs[1] / "finetune.csv")
    for r in rows:
        r["size"] = "tiny"
    _write_rows(dirs[1] / "finetune.csv", rows)
    proc = _run_here(bench, "--merge", f"{out},{dirs[1]}", "--out", str(tmp_path / "bad"))
    assert proc.returncode != 0 and "different checkpoints" in proc.stderr
    proc = _run_here(bench, "--merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr


@pytest.fixture
def checkpoint_copy(tmp_path):
    target = tmp_path / "checkpoints"
    target.mkdir()
    for name in ("cpu.pt", "cpu.json"):
        shutil.copy(CHECKPOINTS / name, target / name)
    return target


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip a byte", "has sha256"),
        ("delete the .pt", "is missing"),
        ("delete the .json", "is missing"),
    ],
)
def test_damaged_checkpoint_is_refused_with_the_rebuild_command(
    bench, checkpoint_copy, tmp_path, damage, message
):
    pt, meta = checkpoint_copy / "cpu.pt", checkpoint_copy / "cpu.json"
    if damage == "flip a byte":
        blob = bytearray(pt.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        pt.write_bytes(bytes(blob))
    elif damage == "delete the .pt":
        pt.unlink()
    else:
        meta.unlink()
    proc = _run_here(
        bench, "--quick", "--quiet", "--checkpoints", str(checkpoint_copy), "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "python benchmarks/forgetting.py --pretrain --size cpu" in proc.stderr
    assert not (tmp_path / "o" / "finetune.csv").exists()


def _load_module():
    import importlib.util

    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("forgetting_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["forgetting_bench"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0"], "expected a positive integer"),
        (["--max-steps", "0"], "expected a positive integer"),
        (["--seed", "-1"], "expected an integer >= 0"),
        (["--lr", "abc"], "expected a learning rate"),
        (["--lr=-1e-3"], "must be finite and > 0"),
        (["--lr", "1e-3,0"], "must be finite and > 0"),
        (["--optimizers", "adamw,sgd"], "unknown optimizer"),
        (["--size", "huge"], "invalid choice"),
        (["--quick", "--full"], "not allowed with argument"),
        (["--pretrain", "--quick"], "conflict with"),
        (["--merge", "a,b", "--full"], "conflict with"),
        (["--merge", "a", "--size-axis", "b"], "conflict with"),
        (["--threads", "0"], "expected a positive integer"),
        (["--device", "tpu"], "--device"),
        (["--device", "cuda:99"], "--device"),
    ],
)
def test_bad_cli_values(bench, args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
