"""MoFO, RandomBCD and HalfAdam on the PyTorch path against the reference math (docs/semantics.md)."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskopt import HalfAdam, MoFO, RandomBCD, cpu_step, mofo_param_groups, topk_count
from maskopt.reference import reference_step, select

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
SHAPES = [(0,), (1,), (4097,), (5, 123), (3, 1, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
fast = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return grads


# Each optimizer with the reference selection it must reproduce.
CASES = {
    "mofo": (MoFO, dict(alpha=0.1), "topk_momentum"),
    "mofo_gradient": (MoFO, dict(alpha=0.25, filter="gradient"), "topk_gradient"),
    "mofo_blocks": (MoFO, dict(alpha=0.2, block_size=64), "topk_momentum"),
    "random_bcd": (RandomBCD, dict(alpha=0.2, seed=7), "random"),
    "random_bcd_exact": (RandomBCD, dict(alpha=0.2, seed=7, exact=True), "random_exact"),
}


def expected_selection(kind, opt, p, grad, index, kw):
    """The reference selection given the optimizer's own new moment (exact, no rounding drift)."""
    state = opt.state[p]
    return select(
        kind,
        state["exp_avg"].double(),
        grad.double(),
        alpha=kw["alpha"],
        block_size=kw.get("block_size"),
        seed=kw.get("seed", 0),
        tensor_index=index,
        counter=int(state["step"].item()),
    ).view(p.shape)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_only_selected_entries_move_and_exactly_k(case, dtype):
    cls, kw, kind = CASES[case]
    params = make_params(SHAPES, dtype)
    opt = cls(params, lr=1e-2, weight_decay=0.1, **kw)
    for step in range(3):
        grads = set_grads(params, seed=step)
        before = [p.detach().clone() for p in params]
        opt.step()
        for i, (p, g, old) in enumerate(zip(params, grads, before, strict=True)):
            mask = expected_selection(kind, opt, p, g, i, kw)
            changed = p.detach() != old
            assert torch.equal(
                p.detach()[~mask].view(torch.int16 if dtype != torch.float32 else torch.int32),
                old[~mask].view(torch.int16 if dtype != torch.float32 else torch.int32),
            ), "an unselected entry changed"
            if dtype == torch.float32:  # lr=1e-2 always moves an fp32 entry of size ~1
                assert torch.equal(changed, mask)
            if kind.startswith("topk"):
                block = kw.get("block_size") or max(p.numel(), 1)
                expected_k = sum(
                    topk_count(min(block, p.numel() - s), kw["alpha"]) for s in range(0, p.numel(), block)
                )
                assert int(mask.sum()) == expected_k


@given(
    n=st.integers(1, 300),
    alpha=st.floats(0.01, 1.0),
    distinct=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
@fast
def test_topk_by_momentum_is_exact_with_lowest_index_ties(n, alpha, distinct, seed):
    # Few distinct gradient values force many ties at the k-th value.
    gen = torch.Generator().manual_seed(seed)
    p = torch.zeros(n, requires_grad=True)
    p.grad = torch.randint(-distinct, distinct + 1, (n,), generator=gen).float()
    opt = MoFO([p], lr=1.0, alpha=alpha)
    opt.step()
    moved = p.detach() != 0
    k = topk_count(n, alpha)
    assert int(moved.sum()) == k or bool((p.grad == 0).any())  # a zero-momentum pick moves by 0
    m = opt.state[p]["exp_avg"].abs()
    order = sorted(range(n), key=lambda i: (-m[i].item(), i))
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[order[:k]] = True
    nonzero_pick = chosen & (m > 0)
    assert torch.equal(moved, nonzero_pick)
    if k < n:
        assert m[chosen].min() >= m[~chosen].max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, dtype):
    # float32 params: float32 moments and arithmetic; float64 params keep float64 throughout,
    # as torch's AdamW gives them
    tol = {torch.float32: (1e-6, 1e-6, 1e-7, 1e-9), torch.float64: (1e-13, 1e-13, 1e-15, 1e-17)}[dtype]
    cls, kw, kind = CASES[case]
    params = make_params(SHAPES, dtype, seed=1)
    ref_params = [p.detach().clone() for p in params]
    ref_states = [{} for _ in params]
    opt = cls(params, lr=1e-2, weight_decay=0.05, **kw)
    for step in range(5):
        grads = set_grads(params, seed=100 + step)
        opt.step()
        for i, (r, g) in enumerate(zip(ref_params, grads, strict=True)):
            reference_step(
                r,
                g,
                ref_states[i],
                **HYPER,
                weight_decay=0.05,
                selection=kind,
                alpha=kw["alpha"],
                block_size=kw.get("block_size"),
                seed=kw.get("seed", 0),
                tensor_index=i,
            )
    for p, r, s in zip(params, ref_params, ref_states, strict=True):
        assert opt.state[p]["exp_avg"].dtype == dtype
        torch.testing.assert_close(p.detach(), r, rtol=tol[0], atol=tol[1])
        torch.testing.assert_close(opt.state[p]["exp_avg"], s["exp_avg"].to(dtype), rtol=tol[0], atol=tol[2])
        torch.testing.assert_close(
            opt.state[p]["exp_avg_sq"], s["exp_avg_sq"].to(dtype), rtol=tol[0], atol=tol[3]
        )


@pytest.mark.parametrize("mask_weight_decay", [True, False])
def test_weight_decay_only_on_selected_entries_by_default(mask_weight_decay):
    p = torch.ones(1000, requires_grad=True)
    opt = MoFO([p], lr=0.1, weight_decay=0.5, alpha=0.1, mask_weight_decay=mask_weight_decay)
    p.grad = torch.linspace(-1, 1, 1000)
    opt.step()
    moved = opt.state[p]["exp_avg"].abs() >= opt.state[p]["exp_avg"].abs().kthvalue(901).values
    unselected = p.detach()[~moved]
    if mask_weight_decay:
        assert torch.all(unselected == 1.0)
    else:
        assert torch.allclose(unselected, torch.full_like(unselected, 1 - 0.1 * 0.5))


@pytest.mark.parametrize(
    "make, default_path",
    [
        (lambda ps: MoFO(ps, lr=3e-3, weight_decay=0.1, alpha=1.0), True),
        (lambda ps: MoFO(ps, lr=3e-3, weight_decay=0.1, alpha=1.0, foreach=False), False),
        (lambda ps: RandomBCD(ps, lr=3e-3, weight_decay=0.1, alpha=1.0), True),
        (lambda ps: HalfAdam(ps, lr=3e-3, weight_decay=0.1, ratio=1.0), True),
        (lambda ps: MoFO(ps, lr=3e-3, weight_decay=0.1, alpha=1.0, fused=False), False),
    ],
)
def test_alpha_one_is_adamw(make, default_path):
    """The compiled CPU step (the default where it builds) rounds as torch's CPU-fused AdamW:
    bitwise equal to it. The PyTorch path takes torch's CPU sqrt (not correctly rounded), as
    torch's default AdamW does, and agrees with it to the last bits."""
    compiled = default_path and cpu_step.available()
    params = make_params([(7, 13), (4097,), (1,)], seed=3)
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = make(params)
    adamw = torch.optim.AdamW(twins, lr=3e-3, weight_decay=0.1, fused=True if compiled else None)
    for step in range(100):
        grads = set_grads(params, seed=step)
        for t, g in zip(twins, grads, strict=True):
            t.grad = g.clone()
        ours.step()
        adamw.step()
    for p, t in zip(params, twins, strict=True):
        if compiled:
            assert torch.equal(p.detach(), t.detach())
        else:
            torch.testing.assert_close(p.detach(), t.detach(), rtol=1e-6, atol=0)


def optimizer_factories():
    return {
        "mofo": lambda ps: MoFO(ps, lr=1e-2, alpha=0.2, weight_decay=0.01),
        "random_bcd": lambda ps: RandomBCD(ps, lr=1e-2, alpha=0.3, seed=5),
        "half_adam": lambda ps: HalfAdam(ps, lr=1e-2, ratio=0.5, seed=3),
    }


@pytest.mark.filterwarnings("ignore:HalfAdam got parameters without names")
@pytest.mark.parametrize("name", list(optimizer_factories()))
def test_resume_equals_uninterrupted(name):
    make = optimizer_factories()[name]
    shapes = [(6, 9), (33,), (2, 3, 5), (11,)]
    straight = make_params(shapes, seed=9)
    opt = make(straight)
    for step in range(7):
        set_grads(straight, step)
        opt.step()

    first = make_params(shapes, seed=9)
    opt1 = make(first)
    for step in range(3):
        set_grads(first, step)
        opt1.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    for step in range(3, 7):
        set_grads(resumed, step)
        opt2.step()
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_foreach_and_single_tensor_paths_agree():
    for kw in (dict(alpha=0.1), dict(alpha=0.3, filter="gradient"), dict(alpha=0.2, block_size=50)):
        a, b = make_params(SHAPES, seed=4), make_params(SHAPES, seed=4)
        oa, ob = MoFO(a, foreach=True, weight_decay=0.1, **kw), MoFO(b, foreach=False, weight_decay=0.1, **kw)
        for step in range(4):
            set_grads(a, step)
            set_grads(b, step)
            oa.step()
            ob.step()
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_random_bcd_frequency_and_reproducibility():
    p = torch.zeros(200_000, requires_grad=True)
    opt = RandomBCD([p], lr=1.0, alpha=0.05, seed=11)
    p.grad = torch.ones_like(p)
    opt.step()
    fraction = (p.detach() != 0).float().mean().item()
    assert abs(fraction - 0.05) < 0.003
    mask = p.detach() != 0
    expected = select(
        "random", torch.ones(200_000), torch.ones(200_000), alpha=0.05, seed=11, tensor_index=0, counter=1
    )
    assert torch.equal(mask, expected)
    # A different step draws a different mask; exact=True moves exactly k.
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal((p.detach() != before), mask)
    q = torch.zeros(1001, requires_grad=True)
    exact = RandomBCD([q], lr=1.0, alpha=0.1, exact=True)
    q.grad = torch.ones_like(q)
    exact.step()
    assert int((q.detach() != 0).sum()) == topk_count(1001, 0.1)


def test_param_groups_with_different_alpha():
    a, b = make_params([(1000,), (1000,)], seed=2)
    opt = MoFO([{"params": [a], "alpha": 0.05}, {"params": [b], "alpha": 0.5}], lr=1e-2)
    set_grads([a, b], 0)
    before_a, before_b = a.detach().clone(), b.detach().clone()
    opt.step()
    assert int((a.detach() != before_a).sum()) == 50
    assert int((b.detach() != before_b).sum()) == 500


def test_mofo_param_groups_leave_biases_and_norms_unfiltered():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    groups = mofo_param_groups(model.named_parameters(), weight_decay=0.1)
    opt = MoFO(groups, alpha=0.1)
    filtered, plain = opt.param_groups
    assert filtered["param_names"] == ["0.weight", "2.weight"] and filtered["weight_decay"] == 0.1
    assert set(plain["param_names"]) == {"0.bias", "1.weight", "1.bias", "2.bias"}
    assert plain["alpha"] == 1.0 and plain["weight_decay"] == 0.0
    model(torch.randn(3, 8)).sum().backward()
    opt.step()


def test_adamw_state_dict_loads_into_mofo_and_back():
    params = make_params([(20, 30), (30,)], seed=6)
    adamw = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.02)
    for step in range(3):
        set_grads(params, step)
        adamw.step()
    mofo = MoFO(params, alpha=0.1)
    mofo.load_state_dict(adamw.state_dict())
    group = mofo.param_groups[0]
    assert group["alpha"] == 0.1 and group["filter"] == "momentum" and group["weight_decay"] == 0.02
    for p in params:
        assert torch.equal(mofo.state[p]["exp_avg"], adamw.state[p]["exp_avg"])
    set_grads(params, 3)
    mofo.step()
    assert all(int(mofo.state[p]["step"]) == 4 for p in params)
    back = torch.optim.AdamW(params)
    back.load_state_dict(mofo.state_dict())
    set_grads(params, 4)
    back.step()
    assert back.param_groups[0]["decoupled_weight_decay"] is True


def test_fp32_moments_survive_a_checkpoint_of_bf16_params():
    p = torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    opt = MoFO([p], alpha=0.5)
    p.grad = torch.randn(64, dtype=torch.bfloat16) * 1e-3
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    state = opt.state_dict()
    fresh = MoFO([p], alpha=0.5)
    fresh.load_state_dict(state)
    assert fresh.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_closure_is_called_and_its_loss_returned():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = MoFO([w], alpha=0.5)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert w.grad is not None


def test_tensors_without_grad_are_skipped():
    a, b = make_params([(10,), (10,)])
    opt = MoFO([a, b], alpha=0.5)
    a.grad = torch.ones(10)
    before = b.detach().clone()
    opt.step()
    assert b not in opt.state or len(opt.state[b]) == 0
    assert torch.equal(b.detach(), before)


@pytest.mark.filterwarnings("ignore:HalfAdam got parameters without names")
def test_lr_zero_and_zero_grads_change_nothing():
    for make in optimizer_factories().values():
        params = make_params([(5, 5), (7,)], seed=8)
        before = [p.detach().clone() for p in params]
        opt = make(params)
        for p in params:
            p.grad = torch.zeros_like(p)
        for group in opt.param_groups:
            group["lr"] = 0.0
        opt.step()
        for p, b in zip(params, before, strict=True):
            assert torch.equal(p.detach(), b)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.999)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(filter="hessian"), "filter"),
        (dict(block_size=0), "block_size"),
        (dict(foreach=True, fused=True), "foreach"),
    ],
)
def test_mofo_argument_errors_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        MoFO(make_params([(3,)]), **kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, argument",
    [
        (RandomBCD, dict(alpha=-0.5), "alpha"),
        (RandomBCD, dict(seed="x"), "seed"),
        (RandomBCD, dict(exact="yes"), "exact"),
        (HalfAdam, dict(ratio=0.0), "ratio"),
        (HalfAdam, dict(ratio=2.0), "ratio"),
        (HalfAdam, dict(strategy="half"), "strategy"),
        (HalfAdam, dict(freeze="grad"), "freeze"),
    ],
)
def test_other_argument_errors(cls, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        cls(make_params([(3,)]), **kwargs)


def test_bad_param_group_is_rejected_without_changing_the_optimizer():
    a, b = make_params([(4,), (4,)])
    opt = MoFO([a], alpha=0.1)
    with pytest.raises(ValueError, match="alpha"):
        opt.add_param_group({"params": [b], "alpha": 3.0})
    assert len(opt.param_groups) == 1


def test_sparse_and_complex_gradients_raise_before_anything_changes():
    dense, sparse = make_params([(4, 3), (4, 3)])
    opt = MoFO([dense, sparse], alpha=0.5)
    dense.grad = torch.ones(4, 3)
    sparse.grad = torch.ones(4, 3).to_sparse()
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense.detach(), before) and len(opt.state) == 0
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    z.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        MoFO([z]).step()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs fused on CPU")
def test_fused_true_on_cpu_raises_clearly():
    with pytest.raises(RuntimeError, match="fused=True"):
        MoFO(make_params([(3,)]), fused=True)


def test_nan_gradients_propagate_like_adamw():
    p = torch.zeros(4, requires_grad=True)
    opt = MoFO([p], alpha=1.0)
    p.grad = torch.tensor([float("nan"), 1.0, 1.0, 1.0])
    opt.step()
    assert math.isnan(p[0].item())


def test_toy_example_mofo_stays_near_pretrained_optimum():
    """MoFO paper §4: L_ft = (θ1−1)²(θ2−1)² from (0,0); Adam → (1,1), MoFO (1 of 2 coords) → (1,0)."""

    def run(make):
        theta = torch.zeros(2, requires_grad=True)
        opt = make([theta])
        for _ in range(2000):
            opt.zero_grad()
            loss = (theta[0] - 1) ** 2 * (theta[1] - 1) ** 2
            loss.backward()
            opt.step()
        return theta.detach()

    adam = run(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    mofo = run(lambda ps: MoFO(ps, lr=1e-2, alpha=0.5))
    assert torch.allclose(adam, torch.tensor([1.0, 1.0]), atol=0.1)
    # One coordinate reaches 1 and the other stays at 0 (pre-training loss 1 instead of 2).
    assert sorted(mofo.tolist()) == pytest.approx([0.0, 1.0], abs=0.1)


@pytest.mark.parametrize("layout", ["normal", "mostly_zero", "few_values", "scaled_rows"])
@pytest.mark.parametrize("alpha", [0.003, 0.1, 0.6])
def test_long_rows_select_exactly_like_the_reference(layout, alpha):
    # Rows >= 2**16 entries take the sampled-bracket route; it must be exact for any layout.
    from maskopt.selection import topk_indices

    gen = torch.Generator().manual_seed(0)
    n = 150_001
    a = torch.randn(n, generator=gen)
    if layout == "mostly_zero":
        a[: n * 9 // 10] = 0.0
    elif layout == "few_values":
        a = torch.randint(0, 4, (n,), generator=gen).float()
    elif layout == "scaled_rows":
        a = (torch.randn(n - 1, generator=gen).view(-1, 100) * torch.logspace(-4, 4, 100)).reshape(-1)
        a = torch.cat([a, torch.zeros(1)])
    (idx,) = topk_indices([a.abs()], alpha)
    expected = select("topk_momentum", a, a, alpha=alpha).nonzero().squeeze(1)
    assert torch.equal(idx, expected)


def test_long_row_selection_survives_an_unlucky_sample(monkeypatch):
    from maskopt import selection

    n = 100_000
    a = torch.arange(n, dtype=torch.float32)
    # A sample of only the largest values puts the bracket above the k-th value.
    monkeypatch.setattr(
        selection, "_sample_positions", lambda length: torch.arange(length - 1000, length).numpy()
    )
    (idx,) = selection.topk_indices([a], 0.2)
    assert torch.equal(idx, torch.arange(n - 20_000, n))
