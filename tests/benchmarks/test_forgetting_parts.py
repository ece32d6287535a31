"""The forgetting benchmark's parts: statistics, the early-stopping loop, checkpoint round trip."""

import dataclasses
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _forgetting_models as models
import _forgetting_stats as st
import _forgetting_train as training


def test_summary_and_t_interval():
    s = st.summarize([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.std == 1.0 and s.n == 3
    assert s.half_width95 == pytest.approx(4.303 / math.sqrt(3))
    assert s.fmt(2) == "2.00 ± 1.00"
    assert s.fmt(2, signed=True, interval=True) == "+2.00 ± 2.48"
    assert not s.excludes_zero()  # the interval 2.00 ± 2.48 covers 0
    one = st.summarize([0.5])
    assert one.n == 1 and math.isnan(one.std) and one.fmt(1) == "0.5" and not one.excludes_zero()
    assert st.summarize([0.30, 0.31, 0.29, 0.30]).excludes_zero()


def test_interval_covers_zero_for_a_noisy_difference():
    assert not st.summarize([-0.1, 0.12, -0.05]).excludes_zero()
    assert st.summarize([-0.10, -0.12, -0.11]).excludes_zero()


def _row(name, lr, seed, ft_loss, forgetting, dist=1.0):
    return dict(
        optimizer=name,
        lr=lr,
        seed=seed,
        ft_loss=ft_loss,
        forgetting=forgetting,
        dist=dist,
        learned=2.0 - ft_loss,
    )


def test_paired_differences_match_lr_and_seed():
    rows = [
        _row("adamw", 1e-3, 0, 1.5, 0.20),
        _row("adamw", 1e-3, 1, 1.6, 0.10),
        _row("mofo15", 1e-3, 0, 1.6, 0.15),
        _row("mofo15", 1e-3, 1, 1.7, 0.12),
        _row("mofo15", 3e-3, 0, 1.4, 0.30),
    ]  # no AdamW partner: left out
    assert st.paired_differences(rows, "forgetting", "mofo15") == pytest.approx([-0.05, 0.02])


def test_interpolate():
    pts = [(1.0, 0.0), (2.0, 1.0), (4.0, 2.0)]
    assert st.interpolate(pts, 1.5) == pytest.approx(0.5)
    assert st.interpolate(pts, 3.0) == pytest.approx(1.5)
    assert st.interpolate(pts, 0.5) is None and st.interpolate(pts, 4.5) is None


def test_equal_learning_gap_reads_both_sweeps_at_one_level():
    # Forgetting falls linearly with English loss: AdamW f = 1 - 0.5 x, MoFO f = 1.1 - 0.5 x,
    # so MoFO forgets 0.1 more at any common English loss, for both seeds.
    rows = []
    for seed in (0, 1):
        for lr, x in ((3e-4, 1.8 + 0.01 * seed), (1e-3, 1.6), (3e-3, 1.4 - 0.01 * seed)):
            rows.append(_row("adamw", lr, seed, x, 1.0 - 0.5 * x))
        for lr, x in ((3e-4, 1.9), (1e-3, 1.7), (3e-3, 1.5 + 0.01 * seed)):
            rows.append(_row("mofo15", lr, seed, x, 1.1 - 0.5 * x))
    gap = st.equal_learning_gap(rows, "mofo15")
    # common range: from the highest start (1.51) to the lowest end (1.80)
    assert gap.level == pytest.approx((1.51 + 1.80) / 2)
    assert gap.gaps == pytest.approx([0.1, 0.1])
    el = st.equal_learning(rows)
    mid = el.levels[1]
    assert el.gap("mofo15", mid) == pytest.approx([0.1, 0.1])


def test_equal_learning_gap_is_none_without_overlap():
    rows = [
        _row("adamw", 1e-3, 0, 1.5, 0.2),
        _row("adamw", 3e-3, 0, 1.4, 0.3),
        _row("mofo15", 1e-3, 0, 1.8, 0.1),
        _row("mofo15", 3e-3, 0, 1.7, 0.15),
    ]
    assert st.equal_learning_gap(rows, "mofo15") is None
    assert st.equal_learning(rows) is None


TINY = models.ModelShape(
    hidden=16, layers=1, heads=2, intermediate=32, seq=16, pretrain_lr=1e-3, pretrain_max_steps=60
)


class _Script:
    """A held-out loss that follows a script instead of evaluating, and records the weights."""

    def __init__(self, model, losses):
        self.model, self.losses, self.weights = model, list(losses), {}

    def __call__(self, step):
        self.weights[step] = training.snapshot(self.model)
        return self.losses.pop(0)


def _tiny_setup():
    import _forgetting_data as data
    import torch

    model = models.build_model(TINY, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = data.Batches(torch.randint(0, 256, (4096,), dtype=torch.uint8), TINY.seq, 4, seed=0)
    return model, opt, batches


def test_plateau_stops_after_patience_and_keeps_the_best_weights():
    import torch

    model, opt, batches = _tiny_setup()
    # evaluations at steps 0, 5, 10, ...: improves until step 10, then only by less than tolerance
    script = _Script(model, [3.0, 2.5, 2.0, 2.005, 1.999, 2.1, 9.9])
    rule = training.StopRule(eval_every=5, patience=3, tolerance=0.01, max_steps=100, warmup=2)
    from _forgetting_progress import Progress

    result = training.train_until_plateau(
        model, opt, batches, rule, torch.device("cpu"), Progress(quiet=True).bar(100, ""), script
    )
    assert result.stopped_by == "plateau"
    assert result.steps == 25  # step 10's reference, then 15, 20, 25 without a 0.01 improvement
    assert result.best_step == 20 and result.best_loss == 1.999  # a small gain still counts as best
    for p, q in zip(model.parameters(), script.weights[20], strict=True):
        assert torch.equal(p, q)
    assert [c["step"] for c in result.curve] == [0, 5, 10, 15, 20, 25]
    assert opt.param_groups[0]["lr"] == 1e-3  # the caller's lr is put back


def test_plateau_with_lr_drops_divides_the_lr_then_stops():
    import torch

    model, opt, batches = _tiny_setup()
    script = _Script(model, [3.0, 2.0, 2.0, 2.0, 1.5, 1.5, 1.5, 1.5])
    rule = training.StopRule(eval_every=5, patience=2, tolerance=0.01, max_steps=100, warmup=1, lr_drops=1)
    from _forgetting_progress import Progress

    result = training.train_until_plateau(
        model, opt, batches, rule, torch.device("cpu"), Progress(quiet=True).bar(100, ""), script
    )
    mults = [c["lr_mult"] for c in result.curve]
    assert mults == [
        1.0,
        1.0,
        1.0,
        1.0,
        1 / training.LR_DROP_DIVISOR,
        1 / training.LR_DROP_DIVISOR,
        1 / training.LR_DROP_DIVISOR,
    ]
    assert result.stopped_by == "plateau" and result.best_step == 20


def test_a_run_that_only_gets_worse_returns_theta0():
    import torch

    model, opt, batches = _tiny_setup()
    theta0 = training.snapshot(model)
    script = _Script(model, [1.0, 2.0, 3.0, 4.0])
    rule = training.StopRule(eval_every=3, patience=3, tolerance=0.0, max_steps=50, warmup=1)
    from _forgetting_progress import Progress

    result = training.train_until_plateau(
        model, opt, batches, rule, torch.device("cpu"), Progress(quiet=True).bar(50, ""), script
    )
    assert result.best_step == 0
    assert training.distance(model, theta0) == 0.0 and training.fraction_moved(model, theta0) == 0.0


def test_pretrain_writes_a_checkpoint_that_loads_and_verifies(tmp_path, monkeypatch):
    import _forgetting_data as data
    import _forgetting_pretrain as pretrain
    import torch
    from _forgetting_progress import Progress

    monkeypatch.setitem(models.SIZES, "tiny", TINY)
    monkeypatch.setattr(
        pretrain, "RULE", dict(eval_every=20, patience=2, tolerance=0.01, warmup=5, lr_drops=1)
    )
    monkeypatch.setattr(pretrain, "EVAL_WINDOWS", 16)
    code = bytes(range(256)) * 400
    corpora = {"code": data.split("code", code, 1), "english": data.split("english", code[::-1], 1)}
    recipe = pretrain.pretrain("tiny", corpora, torch.device("cpu"), Progress(quiet=True), tmp_path, 1)
    assert (tmp_path / "tiny.pt").is_file() and recipe["sha256"] == models.sha256_of(tmp_path / "tiny.pt")
    assert recipe["curve"][0][0] == 0 and recipe["steps_run"] <= TINY.pretrain_max_steps
    assert recipe["command"] == "python benchmarks/forgetting.py --pretrain --size tiny --threads 1"
    model, loaded = models.load_checkpoint("tiny", tmp_path)
    assert loaded == recipe
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the recipe's held-out loss is that of the float16 file, measured after loading it
    windows = data.eval_windows(corpora["code"].held_out, TINY.seq, 16)
    assert training.evaluate(model, windows, pretrain.BATCH, torch.device("cpu"))[0] == pytest.approx(
        recipe["held_out_code_loss"], abs=1e-4
    )
    assert models.corpus_note(recipe, corpora["code"].digest) is None
    assert "differs" in models.corpus_note(recipe, "another-digest")


def test_checkpoint_for_another_shape_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(models.SIZES, "tiny", TINY)
    model = models.build_model(TINY, seed=0)
    models.save_checkpoint(model, "tiny", dict(shape=dataclasses.asdict(TINY)), tmp_path)
    monkeypatch.setitem(models.SIZES, "tiny", dataclasses.replace(TINY, hidden=32))
    with pytest.raises(models.CheckpointError, match="was built for shape"):
        models.load_checkpoint("tiny", tmp_path)


@pytest.mark.parametrize("size", sorted(models.SIZES))
def test_every_size_has_a_shipped_checkpoint_that_verifies(size):
    """The size axis of docs/forgetting.md runs on these files: each loads (sha256 and shape
    checked), has the parameters its recipe states, and stopped by the plateau rule."""
    model, recipe = models.load_checkpoint(size)
    assert sum(p.numel() for p in model.parameters()) == recipe["parameters"]
    assert recipe["stopped_by"] == "plateau" and recipe["steps_run"] < recipe["stop_rule"]["max_steps"]
    assert recipe["held_out_code_loss"] == pytest.approx(recipe["curve"][-1][2], abs=0.05)
