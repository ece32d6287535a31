"""The compiled CPU step (maskopt/cpu_step.py, maskopt/csrc/cpu_step.cpp) against the PyTorch
path: bitwise equal once both take a correctly rounded sqrt; its routing; its fallback."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from maskopt import MoFO, RandomBCD, cpu_step, pytorch_path
from maskopt.policy import SelectionPolicy

pytestmark = pytest.mark.skipif(
    not cpu_step.available(), reason=f"no compiled CPU step: {cpu_step.build_error()}"
)

# Short segments (selected in cache), long ones (two passes, chunks of 2**17), a block
# boundary inside a chunk, an empty and a one-entry tensor.
SHAPES = [(0,), (1,), (5, 123), (40001,), (3, 100_003), (300_000,)]
POLICIES = [
    SelectionPolicy("all"),
    SelectionPolicy("topk_momentum", 0.1),
    SelectionPolicy("topk_momentum", 0.5),
    SelectionPolicy("topk_gradient", 0.03),
    SelectionPolicy("topk_momentum", 0.2, block_size=64),
    SelectionPolicy("topk_momentum", 0.1, block_size=70_000),
    SelectionPolicy("topk_gradient", 0.3, block_size=1),
    SelectionPolicy("random", 0.1, seed=7),
    SelectionPolicy("random_exact", 0.25, seed=3),
    SelectionPolicy("random", 0.2, seed=1, counter=5),
]
DECAYS = [(0.0, True), (0.1, True), (0.1, False)]


def _exact_sqrt(monkeypatch):
    """The PyTorch path with IEEE sqrt: torch's CPU sqrt (MKL's vector math) is not correctly
    rounded, the compiled step's is."""
    monkeypatch.setattr(torch, "_foreach_sqrt", lambda xs: [torch.from_numpy(np.sqrt(x.numpy())) for x in xs])
    monkeypatch.setattr(torch.Tensor, "sqrt", lambda x: torch.from_numpy(np.sqrt(x.numpy())))


def _lists(shapes, seed, grads=None):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    if grads is None:
        grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    exp_avgs = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    exp_avg_sqs = [torch.rand(s, generator=gen) * 1e-6 for s in shapes]
    steps = [torch.tensor(float(3 + i)) for i in range(len(shapes))]
    return [params, grads, exp_avgs, exp_avg_sqs, steps]


def _both(shapes, policy, seed=0, grads=None, **hyper):
    ours = _lists(shapes, seed, grads)
    theirs = [[x.clone() for x in xs] for xs in ours]
    kwargs = dict(
        policy=policy,
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        mask_weight_decay=True,
        tensor_indices=list(range(len(shapes))),
    )
    kwargs.update(hyper)
    before = [p.clone() for p in ours[0]]
    cpu_step.masked_adam_cpu_(*ours, **kwargs)
    pytorch_path.masked_adam_(*theirs, **kwargs)
    return ours, theirs, before


def _assert_equal(ours, theirs):
    for what, a, b in zip(("param", "grad", "exp_avg", "exp_avg_sq", "step"), ours, theirs, strict=True):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(x, y), f"{what} {i}: {(x != y).sum().item()} entries differ"


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("weight_decay, mask_weight_decay", DECAYS)
def test_bitwise_equal_to_pytorch_path_with_ieee_sqrt(monkeypatch, policy, weight_decay, mask_weight_decay):
    _exact_sqrt(monkeypatch)
    ours, theirs, _ = _both(SHAPES, policy, weight_decay=weight_decay, mask_weight_decay=mask_weight_decay)
    _assert_equal(ours, theirs)


@pytest.mark.parametrize("beta1", [0.3, 0.0, 0.999])
def test_large_lerp_weight_and_grad_scale(monkeypatch, beta1):
    """1 - beta1 >= 0.5 takes torch's other lerp formula; GradScaler's scale divides first."""
    _exact_sqrt(monkeypatch)
    policy = SelectionPolicy("topk_momentum", 0.1)
    ours, theirs, _ = _both(SHAPES, policy, beta1=beta1, grad_scale=torch.tensor(4096.0))
    _assert_equal(ours, theirs)


@pytest.mark.parametrize("wave_chunks", [1, 2])
def test_waves_of_long_segments(monkeypatch, wave_chunks):
    """Long segments stepped a few chunks at a time (the memory bound on large models): the
    same bits as one wave."""
    _exact_sqrt(monkeypatch)
    monkeypatch.setattr(cpu_step, "WAVE_CHUNKS", wave_chunks)
    for policy in (
        SelectionPolicy("topk_momentum", 0.1),
        SelectionPolicy("topk_gradient", 0.2, block_size=40_000),
    ):
        ours, theirs, _ = _both(SHAPES, policy, weight_decay=0.1, mask_weight_decay=False)
        _assert_equal(ours, theirs)


def test_unpatched_sqrt_moments_and_masks_bitwise_parameters_to_last_bits():
    policy = SelectionPolicy("topk_momentum", 0.1)
    ours, theirs, before = _both(SHAPES, policy, weight_decay=0.1)
    for name, k in (("exp_avg", 2), ("exp_avg_sq", 3)):
        for x, y in zip(ours[k], theirs[k], strict=True):
            assert torch.equal(x, y), name
    for p, q, p0 in zip(ours[0], theirs[0], before, strict=True):
        assert torch.equal(p != p0, q != p0)  # the same entries moved
        # a few ulp of the parameter, or of the update (lr = 1e-3) where the two cancel
        torch.testing.assert_close(p, q, rtol=4e-7, atol=1e-10)


@pytest.mark.parametrize(
    "policy",
    [SelectionPolicy("topk_momentum", 0.1), SelectionPolicy("topk_gradient", 0.37, block_size=50_000)],
    ids=str,
)
def test_ties_and_nan_lowest_index_first(monkeypatch, policy):
    """Keys that tie across a whole long segment (the boundary bin holds every entry), zeros,
    and NaN (ranked above +inf)."""
    _exact_sqrt(monkeypatch)
    shapes = [(200_000,), (150_000,), (60_000,)]
    grads = [torch.full(shapes[0], 2e-3), torch.zeros(shapes[1]), torch.randn(shapes[2]) * 1e-3]
    grads[1][::1000] = 1e-3
    grads[2][17] = float("nan")
    grads[2][40_000] = float("inf")
    ours, theirs, _ = _both(shapes, policy, grads=grads)
    for k in (2,):  # the momenta are equal (NaN where the gradient was)
        for x, y in zip(ours[k], theirs[k], strict=True):
            assert torch.equal(x.nan_to_num(), y.nan_to_num())
    for p, q in zip(ours[0], theirs[0], strict=True):
        assert torch.equal(p.isnan(), q.isnan())
        assert torch.equal(p.nan_to_num(), q.nan_to_num())


def test_thread_count_does_not_change_bits(monkeypatch):
    policy = SelectionPolicy("topk_momentum", 0.1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _, _ = _both(SHAPES, policy, seed=4)
        torch.set_num_threads(max(2, threads))
        many, _, _ = _both(SHAPES, policy, seed=4)
    finally:
        torch.set_num_threads(threads)
    _assert_equal(one, many)


def _spy(monkeypatch):
    calls = []
    real = cpu_step.masked_adam_cpu_

    def spy(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(cpu_step, "masked_adam_cpu_", spy)
    return calls


@pytest.mark.parametrize(
    "options, compiled",
    [({}, True), (dict(fused=False), False), (dict(foreach=True), False), (dict(foreach=False), False)],
)
def test_routing_by_options(monkeypatch, options, compiled):
    calls = _spy(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(10, 10)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    MoFO(params, alpha=0.2, **options).step()
    assert (calls == [3]) == compiled


def test_tensors_it_cannot_take_go_to_the_pytorch_path(monkeypatch):
    calls = _spy(monkeypatch)
    plain = torch.nn.Parameter(torch.randn(8, 8))
    half = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    strided = torch.nn.Parameter(torch.randn(8, 8).t())
    for p in (plain, half, strided):
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in (plain, half, strided)]
    RandomBCD([plain, half, strided], alpha=0.5).step()
    assert calls == [1]
    assert all(not torch.equal(p.detach(), b) for p, b in zip((plain, half, strided), before, strict=True))


def test_version_counters_advance():
    """Writes through raw pointers still tell autograd that the tensors changed in place."""
    p = torch.nn.Parameter(torch.randn(100))
    p.grad = torch.randn(100)
    opt = MoFO([p], alpha=1.0)
    opt.step()
    before = p._version
    opt.step()
    assert p._version > before


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    """Without a compiler: one RuntimeWarning naming the reason, then the PyTorch path, whose
    results are those of fused=False."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MASKOPT_CACHE_DIR", str(tmp_path / "cache"))
    for name, value in (("_loaded", False), ("_library", None), ("_error", None)):
        monkeypatch.setattr(cpu_step, name, value)
    with pytest.warns(RuntimeWarning, match="compiled CPU step is unavailable"):
        assert not cpu_step.available()
    assert "does not run" in cpu_step.build_error()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_step.available()  # once
        results = []
        for options in ({}, dict(fused=False)):
            p = torch.nn.Parameter(torch.linspace(-1, 1, 50))
            p.grad = torch.linspace(1, -1, 50)
            MoFO([p], alpha=0.1, **options).step()
            results.append(p.detach())
    assert torch.equal(*results)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MASKOPT_CPU_STEP", "0")
    for name, value in (("_loaded", False), ("_library", None), ("_error", None)):
        monkeypatch.setattr(cpu_step, name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_step.available()
    assert cpu_step.build_error() == "disabled by MASKOPT_CPU_STEP=0"
