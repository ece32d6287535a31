"""The step benchmarks run end to end on CPU (numbers are not checked, their output is)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(args, **env):
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
        check=True,
    ).stdout


def test_cpu_step_benchmark_prints_ratios_against_adamw():
    out = run(
        [
            "benchmarks/cpu_step.py",
            "--size",
            "1m",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--only",
            "adamw-foreach,mofo,half",
        ]
    )
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line and not line.startswith("#")}
    assert rows["adamw-fused"][2] == "1.00" and rows["adamw-foreach"][3] == "1.00"
    assert float(rows["mofo"][2]) > 0 and "adamw-half" in rows and "x adamw-half" in " ".join(rows["half"])


@pytest.mark.slow
def test_step_bench_quick_mode_writes_its_csv(tmp_path):
    target = tmp_path / "bench.csv"
    run(["benchmarks/step_bench.py", "--quick", "--csv", str(target)])
    with target.open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {"device", "commit"} <= set(rows[0])


def test_fsdp_step_benchmark_runs_the_sharded_path():
    out = run(["benchmarks/fsdp_step.py", "--quick"], MASTER_PORT=str(_free_port()))
    lines = {line.split(":")[0].strip(): line for line in out.splitlines()}
    assert "MoFO fused, sharded" in lines and "MoFO fused, unsharded" in lines
    assert float(lines["sharded / unsharded"].split(":")[1].strip().rstrip("x")) > 0


def _free_port():
    from _helpers import free_port

    return free_port()
