"""The forgetting study's peers (LoRA, BAdam, LISA, WiSE-FT), the KL to theta0 and the trade-off tables."""

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _forgetting_models as models
import _forgetting_optimizers as optimizers
import _forgetting_peers as peers
import _forgetting_report as report
import _forgetting_tradeoff as tradeoff
import _forgetting_train as training

SHAPE = models.ModelShape(
    hidden=16, layers=3, heads=2, intermediate=32, seq=16, pretrain_lr=1e-3, pretrain_max_steps=60
)


def _model():
    return models.build_model(SHAPE, seed=0)


def _batch():
    return torch.randint(0, 256, (4, SHAPE.seq), generator=torch.Generator().manual_seed(0))


def _train(trainer, steps):
    x = _batch()
    for step in range(1, steps + 1):
        if trainer.before_step is not None:
            trainer.before_step(step)
        trainer.module(input_ids=x, labels=x).loss.backward()
        training.clip_gradients(trainer.module, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return trainer.finish()


def _moved(model, theta0):
    names = [n for n, _ in model.named_parameters()]
    return {n for n, p, q in zip(names, model.parameters(), theta0, strict=True) if not torch.equal(p, q)}


def test_lora_moves_only_the_adapted_projections_and_merges_into_the_same_parameters():
    pytest.importorskip("peft")
    model = _model()
    theta0 = training.snapshot(model)
    names = [n for n, _ in model.named_parameters()]
    merged = _train(peers.setup("lora4", model, 1e-2, 0, optimizers.BETAS, optimizers.EPS), 3)
    assert [n for n, _ in merged.named_parameters()] == names
    moved = _moved(merged, theta0)
    assert moved and all(n.split(".")[-2] in peers.LORA_TARGETS for n in moved)
    assert {n.split(".")[-2] for n in moved} == set(peers.LORA_TARGETS)
    # a rank-4 update: the change of a 16 x 16 projection has rank at most 4
    delta = dict(merged.named_parameters())["model.layers.0.self_attn.q_proj.weight"] - theta0[1]
    assert torch.linalg.matrix_rank(delta.detach(), atol=1e-7) <= 4


def test_badam_layer_trains_one_decoder_layer_between_switches():
    pytest.importorskip("badam")
    model = _model()
    theta0 = training.snapshot(model)
    trained = _train(peers.setup("badam-layer", model, 1e-2, 0, optimizers.BETAS, optimizers.EPS), 3)
    layers = {n.split(".")[2] for n in _moved(trained, theta0)}
    assert len(layers) == 1  # embedding and head stay frozen, one layer in 3 < SWITCH_EVERY steps


def test_badam_ratio_moves_a_fraction_of_each_matrix():
    pytest.importorskip("badam")
    model = _model()
    theta0 = training.snapshot(model)
    trained = _train(peers.setup("badam-ratio", model, 1e-2, 0, optimizers.BETAS, optimizers.EPS), 3)
    params = dict(trained.named_parameters())
    assert torch.equal(params["model.embed_tokens.weight"], theta0[0])
    q = params["model.layers.0.self_attn.q_proj.weight"]
    frac = q.ne(theta0[1]).float().mean().item()
    assert 0 < frac <= peers.BADAM_RATIO + 1e-9


def test_lisa_trains_the_drawn_layers_with_the_embedding_and_head():
    model = _model()
    theta0 = training.snapshot(model)
    trainer = peers.setup("lisa", model, 1e-2, 0, optimizers.BETAS, optimizers.EPS)
    trained = _train(trainer, 3)  # within one period: one draw
    moved = _moved(trained, theta0)
    assert "model.embed_tokens.weight" in moved and "lm_head.weight" in moved
    assert len({n.split(".")[2] for n in moved if ".layers." in n}) == peers.LISA_LAYERS
    trainer.before_step(1 + peers.LISA_PERIOD)  # a new period draws again
    assert sum(any(p.requires_grad for p in layer.parameters()) for layer in model.model.layers) == 1


def test_clip_gradients_treats_sparse_gradients_like_their_dense_form():
    dense, sparse = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    g = torch.zeros(4, 4)
    g[0, :2] = torch.tensor([3.0, 4.0])
    dense.weight.grad, sparse.weight.grad = g.clone(), g.clone().to_sparse()
    dense.bias.grad, sparse.bias.grad = torch.full((4,), 1.0), torch.full((4,), 1.0)
    training.clip_gradients(dense, 1.0)
    training.clip_gradients(sparse, 1.0)
    assert torch.allclose(sparse.weight.grad.to_dense(), dense.weight.grad)
    assert torch.allclose(sparse.bias.grad, dense.bias.grad)
    assert torch.linalg.vector_norm(torch.cat([dense.weight.grad.flatten(), dense.bias.grad])) == (
        pytest.approx(1.0, abs=1e-5)
    )


def test_kl_is_zero_at_theta0_and_positive_after_a_step():
    model = _model()
    windows = torch.randint(0, 256, (6, SHAPE.seq), generator=torch.Generator().manual_seed(1))
    ref = training.log_probs(model, windows, 2, torch.device("cpu"))
    assert training.kl_to_reference(model, windows, ref, 2, torch.device("cpu")) == pytest.approx(0, abs=1e-6)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    kl = training.kl_to_reference(model, windows, ref, 2, torch.device("cpu"))
    # the same quantity straight from the definition
    logp = training.log_probs(model, windows, 2, torch.device("cpu"))
    assert kl == pytest.approx(float((logp.exp() * (logp - ref)).sum(-1).mean()), rel=1e-5)
    assert kl > 0


def test_family_names():
    assert optimizers.family("mofo15") == "mofo" and optimizers.family("mofo15-grad") == "mofo-grad"
    assert optimizers.family("lora64") == "lora" and optimizers.family("wiseft40") == "wiseft"
    assert optimizers.family("badam-ratio") == "badam-ratio" and optimizers.family("adamw") == "adamw"


REF = dict(ft_loss=2.0, code_loss=1.0)


def _run(name, lr, seed, ft_loss, forgetting, kl):
    return dict(
        optimizer=name,
        label=name,
        lr=lr,
        seed=seed,
        ft_loss=ft_loss,
        forgetting=forgetting,
        kl=kl,
        dist=10 * kl,
        moved=0.5,
        learned=REF["ft_loss"] - ft_loss,
        best_step=100,
        ms_step=1.0,
        curve=[],
    )


def _synthetic():
    """AdamW's WiSE-FT curve is forgetting = 2 - x on English loss x in [1, 2] (theta0 at x = 2),
    with KL = 2 - x; LoRA sits 0.05 above that curve at equal English loss and 0.1 below it at
    equal KL, for both seeds."""
    rows = []
    for seed in (0, 1):
        rows.append(_run("adamw", 1e-3, seed, 1.0, 1.0, 1.0))
        for lam in optimizers.WISE_LAMBDAS:
            x = 2.0 - lam
            rows.append(_run(f"wiseft{round(100 * lam)}", 1e-3, seed, x, 2.0 - x, 2.0 - x))
        x = 1.5 + 0.01 * seed
        rows.append(_run("lora16", 3e-3, seed, x, 2.05 - x, 2.15 - x))
        rows.append(_run("lora4", 3e-3, seed, 1.9, 0.6, 0.5))  # dominated by lora16: off the front
    return rows


def test_front_keeps_only_configurations_no_other_beats():
    curves = tradeoff.Curves(_synthetic(), REF)
    assert curves.fronts["lora"] == [("lora16", 3e-3)]
    assert curves.fronts["wiseft"][0] == ("adamw", 1e-3) and curves.fronts["wiseft"][-1] == ("theta0", 0.0)
    assert len(curves.fronts["wiseft"]) == 2 + len(optimizers.WISE_LAMBDAS)


def test_gaps_read_the_reference_curve_at_the_runs_own_learning_and_kl():
    curves = tradeoff.Curves(_synthetic(), REF)
    assert curves.gaps("lora16", 3e-3, "wiseft", "ft_loss") == pytest.approx([0.05, 0.05])
    # at LoRA's KL 0.65 the WiSE curve forgets 0.65; LoRA forgets 0.55
    assert curves.gaps("lora16", 3e-3, "wiseft", "kl") == pytest.approx([-0.1, -0.1])
    # AdamW's lr sweep is a single point: no curve to read
    assert curves.gaps("lora16", 3e-3, "adamw", "ft_loss") == []
    table = tradeoff.configuration_table(curves, report.fmt_table)
    assert "+0.050 ± 0.000" in table and "-0.100 ± 0.000" in table
    rows = {(r["optimizer"], r["seed"]): r for r in tradeoff.tradeoff_rows(curves)}
    assert rows[("lora16", 0)]["wiseft_forgetting_at_ft_loss"] == pytest.approx(0.5)
    assert rows[("lora16", 0)]["adamw_forgetting_at_kl"] == ""


def test_equal_kl_reads_the_interpolation_up_to_the_run_it_interpolates():
    """When WiSE-FT at lambda = 0.8 learns more and forgets less than its AdamW run (so AdamW
    is off the front in English loss and forgetting), the curve of forgetting over KL still goes
    on to the AdamW run: a configuration with a KL between the two is read on it, not n/a."""
    rows = []
    for seed in (0, 1):
        rows.append(_run("adamw", 1e-3, seed, 1.25, 1.0, 1.0))
        for lam in optimizers.WISE_LAMBDAS:  # English loss 2 - lam: 1.2 at lambda = 0.8
            rows.append(_run(f"wiseft{round(100 * lam)}", 1e-3, seed, 2.0 - lam, lam / 2, lam / 2))
        rows.append(_run("mofo15", 1e-3, seed, 1.3, 0.5, 0.7))
    curves = tradeoff.Curves(rows, REF)
    assert ("adamw", 1e-3) not in curves.fronts["wiseft"]
    assert curves.kl_fronts["wiseft"][-1] == ("adamw", 1e-3)
    # KL 0.7 lies between lambda = 0.8 (KL 0.4, forgetting 0.4) and AdamW (KL 1, forgetting 1)
    assert curves.gaps("mofo15", 1e-3, "wiseft", "kl") == pytest.approx([-0.2, -0.2])


def test_levels_table_names_the_family_that_forgets_least():
    rows = _synthetic()
    for seed in (0, 1):  # MoFO: a curve 0.2 below WiSE-FT's over x in [1.2, 1.8]
        for lr, x in ((3e-4, 1.8), (1e-3, 1.2)):
            rows.append(_run("mofo15", lr, seed, x, 1.8 - x + 0.01 * seed, 0.1))
    curves = tradeoff.Curves(rows, REF)
    levels = curves.levels()
    assert levels and all(1.2 <= x <= 1.8 for x in levels)
    for x in levels:
        assert curves.at_level("mofo", x) == pytest.approx([1.8 - x, 1.81 - x])
    table = tradeoff.levels_table(curves, report.fmt_table)
    winners = [line.split("|")[-3].strip() for line in table.splitlines()[2:]]
    assert winners == ["MoFO (α, lr)"] * len(levels)
    assert "LoRA" not in table  # one configuration per seed, at different losses: no common level


def test_spearman_and_bootstrap_interval():
    import numpy as np

    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert tradeoff.spearman(x, x**3) == pytest.approx(1.0)
    assert tradeoff.spearman(x, -x) == pytest.approx(-1.0)
    assert tradeoff.spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(
        math.sqrt(3) / 2
    )
    rows = [_run("mofo15", 1e-3, s, 1.0, 0.1 * s, 0.1 * s) for s in range(12)]
    rows += [_run("wiseft20", 1e-3, s, 1.0, 0.1 * s, -0.1 * s) for s in range(12)]  # left out
    corr = {c["measure"]: c for c in tradeoff.rank_correlations(rows, resamples=200)}
    assert corr["kl"]["runs"] == 12 and corr["kl"]["rho"] == pytest.approx(1.0)
    assert corr["kl"]["lo"] == pytest.approx(1.0)
    assert math.isnan(corr["moved"]["rho"])  # constant: no ranking


def test_tables_of_an_lr_without_adamw(capsys):
    """LoRA's own lr (3e-3 here) has no AdamW run: its same-lr table prints, its paired one does not."""
    import _forgetting_tables as tables

    tables.print_finetune_tables(REF, _synthetic())
    out = capsys.readouterr().out
    assert "Same lr for every optimizer (the papers' protocol): lr 0.003" in out
    assert "Against AdamW at lr 0.003" not in out and "The trade-off across methods" in out


def test_early_stopping_gap_pairs_with_adamw_at_the_nearest_lr():
    # AdamW (lr 1e-3) passes validation loss 1.2 with forgetting 0.4 on its way to 1.0; LoRA (3e-3, no
    # AdamW there) stops at 1.2 with 0.4 (no gap), then with 0.5 (0.1 more), for both seeds.
    rows = _synthetic()
    for r in rows:
        if r["optimizer"] == "adamw":
            r["curve"] = [
                dict(step=s, english_val=v, forgetting=f) for s, v, f in ((0, 2.0, 0), (1, 1.0, 0.5))
            ]
        if r["optimizer"] == "lora16":
            r["curve"] = [
                dict(step=s, english_val=v, forgetting=f) for s, v, f in ((0, 2.0, 0), (1, 1.2, 0.4))
            ]
    curves = tradeoff.Curves(rows, REF)
    assert curves.early_stopping_gaps("lora16", 3e-3) == pytest.approx([0.0, 0.0])
    for r in rows:
        if r["optimizer"] == "lora16":
            r["curve"][-1]["forgetting"] = 0.5
    assert curves.early_stopping_gaps("lora16", 3e-3) == pytest.approx([0.1, 0.1])
    assert curves.early_stopping_gaps("lora4", 3e-3) == []  # no training curve
