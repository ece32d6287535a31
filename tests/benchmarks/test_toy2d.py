"""The MoFO paper's 2-D example: Adam ends near (1, 1), MoFO (alpha=0.5) near (1, 0)."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("maskopt")
_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "toy2d.py"
_spec = importlib.util.spec_from_file_location("toy2d", _PATH)
toy2d = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("toy2d", toy2d)
_spec.loader.exec_module(toy2d)


@pytest.fixture(scope="module")
def ends():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-entry problem: threads only add overhead
    try:
        return {m: toy2d.trajectory(m)[-1] for m in ("adam", "mofo")}
    finally:
        torch.set_num_threads(threads)


def test_adam_goes_to_the_balanced_minimum(ends):
    a = ends["adam"]
    # Adam treats both coordinates alike: it stays on the diagonal and heads for (1, 1).
    # The valley is quartic along the diagonal, so it is still creeping in after 2000 steps.
    assert float(a[0]) == pytest.approx(float(a[1]), abs=1e-6)
    assert abs(float(a[0]) - 1) < 0.08
    assert float(toy2d.finetune_loss(a)) < 1e-4
    assert float(toy2d.pretrain_loss(a)) > 1.7


def test_mofo_goes_to_the_nearer_minimum(ends):
    m = ends["mofo"]
    assert float(m[0]) == pytest.approx(1.0, abs=1e-3)
    assert abs(float(m[1])) < 1e-2
    assert float(toy2d.finetune_loss(m)) < 1e-6
    assert float(toy2d.pretrain_loss(m)) == pytest.approx(1.0, abs=0.02)


def test_mofo_moves_one_coordinate_per_step():
    tr = toy2d.trajectory("mofo", steps=50)
    changed = (tr[1:] != tr[:-1]).sum(dim=1)
    assert (changed <= 1).all()
    # the first step's tie (equal momenta) goes to the lower index: theta1
    assert tr[1, 0] != 0 and tr[1, 1] == 0


def test_script_writes_png(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        assert toy2d.main(["--out", str(tmp_path), "--steps", "200"]) == 0
    finally:
        torch.set_num_threads(threads)
    png = tmp_path / "toy2d.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MoFO" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(SystemExit):
        toy2d.main(["--steps", "0"])
    with pytest.raises(ValueError, match="method"):
        toy2d.trajectory("sgd")
