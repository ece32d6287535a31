"""`benchmarks/forgetting.py --quick` end to end, from an empty cache, in a temp directory."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("maskopt")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "forgetting.py"
LABELS = ["AdamW", "HalfAdam (HFT)", "MoFO a=5%", "MoFO a=15%", "MoFO-grad a=15%", "RandomBCD a=15%"]
CONTINUAL = ["adamw", "halfadam", "mofo5", "rbcd5"]


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    cache = tmp_path_factory.mktemp("cache")
    proc = _run("--quick", "--quiet", "--out", str(out), "--cache", str(cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, cache, proc


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table_on_stdout(quick):
    _, _, proc = quick
    out = proc.stdout
    assert "| optimizer" in out and "forgetting" in out and "entries moved" in out
    for label in LABELS:
        assert f"| {label}" in out, label
    assert "OP (acc %)" in out and "BWT (MoFO)" in out
    # --quiet: no progress bars, only one line per finished optimizer
    assert "step/s" not in proc.stderr


def test_finetune_csv(quick):
    out, _, _ = quick
    rows = _rows(out / "forgetting.csv")
    assert [r["optimizer"] for r in rows] == ["theta0", "adamw", "halfadam", "mofo5", "mofo15",
                                              "mofo15-grad", "rbcd15"]
    by = {r["optimizer"]: {k: float(v) for k, v in r.items() if k not in ("optimizer", "label")}
          for r in rows}
    for name, r in by.items():
        for key in ("ft_loss", "code_loss", "dist", "moved"):
            assert math.isfinite(r[key]), (name, key)
    base = by["theta0"]
    # pre-training worked: the code model knows code better than English
    assert base["code_loss"] < base["ft_loss"] - 0.2
    assert by["adamw"]["dist_rel"] == pytest.approx(1.0)
    for name in ("adamw", "halfadam", "mofo5", "mofo15", "mofo15-grad", "rbcd15"):
        r = by[name]
        assert r["learned"] > 0, name  # every optimizer lowered the held-out English loss
        assert 0 < r["moved"] <= 1 and r["ms_step"] > 0
    # MoFO moves far fewer entries than AdamW, and stays closer to theta0
    assert by["mofo5"]["moved"] < 0.5 * by["adamw"]["moved"]
    assert by["mofo5"]["dist_rel"] < 0.8
    # HalfAdam freezes about half of the layers' tensors
    assert by["halfadam"]["moved"] < 0.8 * by["adamw"]["moved"]


def test_continual_csv_matches_metrics(quick):
    from maskopt.metrics import backward_transfer, overall_performance

    out, _, _ = quick
    rows = {r["optimizer"]: r for r in _rows(out / "continual.csv")}
    assert list(rows) == CONTINUAL
    cells = _rows(out / "continual_matrix.csv")
    tasks = ["english", "codecs", "email", "asyncio"]
    for name in CONTINUAL:
        R = [[None] * 4 for _ in range(4)]
        for c in cells:
            if c["optimizer"] == name and c["eval_task"] in tasks:
                R[int(c["after_task"]) - 1][tasks.index(c["eval_task"])] = float(c["acc"])
        assert float(rows[name]["OP"]) == pytest.approx(overall_performance(R), abs=1e-4)
        assert float(rows[name]["BWT"]) == pytest.approx(backward_transfer(R), abs=1e-4)
        assert float(rows[name]["BWT_hft"]) == pytest.approx(
            backward_transfer(R, convention="hft"), abs=1e-4)


def test_png_and_cache(quick):
    out, cache, _ = quick
    png = out / "forgetting.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 400_000
    assert len(list(cache.glob("pretrain-quick-*.pt"))) == 1


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
        (["--steps", "0"], "expected a positive integer"),
        (["--seed", "-1"], "expected an integer >= 0"),
        (["--lr", "abc"], "expected a learning rate"),
        (["--lr=-1e-3"], "must be finite and > 0"),
        (["--lr", "1e-3,0"], "must be finite and > 0"),
        (["--optimizers", "adamw,sgd"], "unknown optimizer"),
        (["--size", "huge"], "invalid choice"),
        (["--quick", "--size", "gpu"], "conflicts"),
        (["--continual", "--mode", "finetune"], "conflicts"),
        (["--threads", "0"], "expected a positive integer"),
        (["--device", "tpu"], "--device"),
        (["--device", "cuda:99"], "--device"),
    ],
)
def test_bad_cli_values(args, message, capsys):
    mod = _load_module()
    with pytest.raises(SystemExit) as exc:
        mod.parse_args(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
