"""The fused Triton path against the reference math and the PyTorch path.

On a CPU-only machine (CI) the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1``, set here before Triton is imported); with a CUDA device (and
TRITON_INTERPRET unset) the same tests run the compiled kernels on the GPU. The kernel knobs
(chunk length, the single-pass segment limit) are shrunk so that small tensors exercise the
multi-chunk, multi-level radix path as well as the single-pass path.
"""

from __future__ import annotations

import importlib
import math
import os

import torch

_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
_ORIGINAL_ENV = os.environ.get("TRITON_INTERPRET")
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first kernel import
_TEST_ENV = os.environ.get("TRITON_INTERPRET")

import pytest

pytest.importorskip("triton")

from maskopt import _hash
from maskopt.kernels import fused_adam_step_, is_available
from maskopt.policy import SelectionPolicy
from maskopt.pytorch_path import masked_adam_
from maskopt.reference import reference_step
from maskopt.selection import topk_count

DEVICE = torch.device("cuda" if _CUDA else "cpu")


def _load_launch():
    """maskopt.kernels.launch, built for this device (reloaded if another module imported it
    in the other mode: TRITON_INTERPRET is read when the kernels are decorated)."""
    from maskopt.kernels import launch

    if (DEVICE.type == "cpu") != launch._kernels_interpreted():
        for name in (
            "_common",
            "_dense",
            "_window",
            "_fallback",
            "_local",
            "_apply",
            "_resolve",
            "_levels",
            "plan",
            "launch",
        ):
            importlib.reload(importlib.import_module(f"maskopt.kernels.{name}"))
        from maskopt.kernels import launch
    return launch


launch = _load_launch()
pytestmark = pytest.mark.skipif(not is_available(DEVICE), reason="fused path unavailable here")


def _set_env(value):
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value


# The kernels are built now; give the variable back so that other test modules collected in
# the same session see the environment they were started with, and set it again only while
# this module's tests run (the dispatch reads it to allow fused=True on CPU).
_set_env(_ORIGINAL_ENV)


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    _set_env(_TEST_ENV)
    yield
    _set_env(_ORIGINAL_ENV)


HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
SMALL = dict(chunk=1024, local_max=4096, local_tile=4096)  # single-pass for tensors <= 4096
MULTI = dict(chunk=1024, local_max=128, local_tile=1024, cand_min=16)  # nearly everything multi-pass
# ...with the fallback and candidate selects spread over many programs, several candidate
# blocks per segment
SPREAD = dict(MULTI, spread_min=0, cand_block=32, resolve_tile=16)
SHAPES = [(0,), (1,), (5, 123), (4097,), (2000,), (3, 700)]


@pytest.fixture(params=["single", "multi"])
def layout(request):
    with launch.config(**(SMALL if request.param == "single" else MULTI)):
        yield request.param


def _tensors(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtype if isinstance(dtype, (list, tuple)) else [dtype] * len(shapes)
    ps = [torch.randn(s, generator=gen).to(dt).to(DEVICE) for s, dt in zip(shapes, dtypes, strict=True)]
    ms = [torch.zeros(s, device=DEVICE) for s in shapes]
    vs = [torch.zeros(s, device=DEVICE) for s in shapes]
    steps = [torch.zeros((), device=DEVICE) for _ in shapes]
    return ps, ms, vs, steps


def _grads(ps, seed, kind="normal"):
    gen = torch.Generator().manual_seed(1000 + seed)
    out = []
    for p in ps:
        if kind == "normal":
            g = torch.randn(p.shape, generator=gen)
        elif kind == "ternary":  # massive exact ties in |g| and |m|
            g = torch.randint(-1, 2, p.shape, generator=gen).float()
        elif kind == "sparse_rows":  # embedding-like: most entries exactly zero
            g = torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) < 0.05)
        out.append(g.to(p.dtype).to(DEVICE))
    return out


def _run(
    selection,
    ps,
    ms,
    vs,
    steps,
    grads,
    *,
    alpha=0.1,
    block_size=None,
    mwd=True,
    hash_counter=None,
    seed=7,
    grad_scale=None,
    found_inf=None,
    hp=HP,
    fn=None,
):
    policy = SelectionPolicy(selection, alpha, block_size, seed, hash_counter)
    (fn or fused_adam_step_)(
        ps,
        grads,
        ms,
        vs,
        steps,
        policy=policy,
        mask_weight_decay=mwd,
        tensor_indices=[3 * i + 1 for i in range(len(ps))],
        grad_scale=grad_scale,
        found_inf=found_inf,
        **hp,
    )


def _compare_with_reference(
    selection,
    shapes,
    *,
    dtype=torch.float32,
    steps_n=2,
    alpha=0.1,
    block_size=None,
    mwd=True,
    hash_counter=None,
    grad_kind="normal",
    hp=HP,
):
    ps, ms, vs, steps = _tensors(shapes, dtype)
    ref_p = [p.detach().cpu().clone() for p in ps]
    ref_state = [{} for _ in shapes]
    for it in range(steps_n):
        grads = _grads(ps, it, grad_kind)
        before = [p.detach().cpu().clone() for p in ps]
        _run(
            selection,
            ps,
            ms,
            vs,
            steps,
            grads,
            alpha=alpha,
            block_size=block_size,
            mwd=mwd,
            hash_counter=hash_counter,
            hp=hp,
        )
        for i, p in enumerate(ps):
            mask = reference_step(
                ref_p[i],
                grads[i].cpu(),
                ref_state[i],
                selection=selection,
                alpha=alpha,
                block_size=block_size,
                mask_weight_decay=mwd,
                seed=7,
                tensor_index=3 * i + 1,
                hash_counter=hash_counter,
                **hp,
            )
            got = p.detach().cpu()
            # exact selection: the unselected entries keep their bits, the selected all move
            if mwd or hp["weight_decay"] == 0:
                assert torch.equal(got[~mask], before[i][~mask]), f"tensor {i}: unselected entry written"
            if p.dtype == torch.float32:  # (a 16-bit entry may legitimately round back)
                assert bool((got[mask] != before[i][mask]).all()), (
                    f"tensor {i}: a selected entry did not move"
                )
            if selection.startswith("topk") and block_size is None and p.numel():
                assert int(mask.sum()) == topk_count(p.numel(), alpha)
    for i, p in enumerate(ps):
        assert steps[i].item() == steps_n
        if p.numel() == 0:
            continue
        rtol = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[p.dtype]
        torch.testing.assert_close(p.detach().cpu().double(), ref_p[i].double(), rtol=rtol, atol=rtol)
        torch.testing.assert_close(ms[i].cpu().double(), ref_state[i]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(vs[i].cpu().double(), ref_state[i]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------------------- basics


def test_is_available():
    assert is_available(DEVICE)
    assert not is_available("meta")


@pytest.mark.parametrize("n_steps", [3, pytest.param(100, marks=pytest.mark.slow)])
def test_all_equals_torch_adamw(n_steps):
    shapes = [(3000,), (5, 123), (1,), (0,), (4100,)]
    ps, ms, vs, steps = _tensors(shapes)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    with launch.config(**SMALL):
        for it in range(n_steps):
            grads = _grads(ps, it)
            for r, g in zip(ref, grads, strict=True):
                r.grad = g.clone()
            opt.step()
            _run("all", ps, ms, vs, steps, grads)
    for p, r, m, v in zip(ps, ref, ms, vs, strict=True):
        st = opt.state[r]
        if p.numel():
            rel = float((p.double() - r.detach().double()).norm() / r.detach().double().norm())
            assert rel <= 1e-6, f"relative error {rel:.2e} after {n_steps} steps"
            torch.testing.assert_close(p, r.detach(), rtol=1e-6, atol=1e-6 * n_steps)
            drift = 1 if n_steps < 10 else 5  # lerp vs multiply-add rounding of the moments
            torch.testing.assert_close(m, st["exp_avg"], rtol=1e-6, atol=1e-7 * drift)
            torch.testing.assert_close(v, st["exp_avg_sq"], rtol=1e-6, atol=1e-9 * drift)


@pytest.mark.parametrize("selection", ["topk_momentum", "topk_gradient", "random", "random_exact"])
def test_selection_matches_reference(selection, layout):
    _compare_with_reference(selection, SHAPES, alpha=0.1 if selection != "random" else 0.3)


@pytest.mark.parametrize("block_size", [1000, 64])
def test_block_size_matches_reference(block_size, layout):
    _compare_with_reference(
        "topk_momentum", [(4097,), (5, 123), (2500,), (0,)], block_size=block_size, alpha=0.15, steps_n=1
    )


def test_many_long_segments_with_ties():
    # block_size longer than local_max: every block is a segment of the two-pass path
    with launch.config(**MULTI):
        _compare_with_reference(
            "topk_momentum", [(4097,), (2500,)], block_size=300, alpha=0.15, grad_kind="ternary", steps_n=2
        )


@pytest.mark.parametrize(
    "selection,grad_kind",
    [("topk_momentum", "ternary"), ("topk_gradient", "ternary"), ("topk_momentum", "sparse_rows")],
)
def test_ties_go_to_the_lowest_index(selection, grad_kind, layout):
    _compare_with_reference(selection, [(3000,), (64, 70), (7,)], alpha=0.3, grad_kind=grad_kind, steps_n=2)


def test_all_ties_zero_gradient(layout):
    # every |m| is 0 at step 1: the first k entries by index are selected (and decayed)
    ps, ms, vs, steps = _tensors([(2600,), (300,)])
    before = [p.clone() for p in ps]
    _run("topk_momentum", ps, ms, vs, steps, [torch.zeros_like(p) for p in ps], alpha=0.25)
    for p, b in zip(ps, before, strict=True):
        k = topk_count(p.numel(), 0.25)
        changed = p != b
        assert bool(changed[:k].all()) and not bool(changed[k:].any())


MODES = {0: "window", 1: "digit", 2: "zero", 3: "exact"}


def _momenta(kind, shapes, step, gen):
    """Gradients whose momenta put the boundary where each selection mode is needed."""
    out = []
    for s in shapes:
        n = math.prod(s)
        if kind == "gaussian":
            g = torch.randn(n, generator=gen) * 1e-3
        elif kind == "laplace":
            g = torch.distributions.Laplace(0.0, 1e-3).sample((n,))
        elif kind == "row_scaled":
            g = torch.randn(n, generator=gen).view(-1, 100 if n % 100 == 0 else 1)
            g = (g * torch.logspace(-5, -1, g.shape[0])[:, None]).view(-1)
        elif kind == "few_values":
            g = torch.randint(1, 4, (n,), generator=gen).float() * 1e-3
        elif kind == "zeros":
            g = torch.zeros(n)
        elif kind == "mostly_zero":  # embedding rows never seen: most |m| exactly 0
            g = torch.randn(n, generator=gen) * 1e-3 * (torch.arange(n) % 17 == 3)
        elif kind == "spikes":  # x1000 then x0.001: the threshold leaves the window
            g = torch.randn(n, generator=gen) * 1e-3 * (1000.0 if step == 2 else 1e-3 if step == 3 else 1.0)
        out.append(g.view(s).to(DEVICE))
    return out


@pytest.mark.parametrize(
    "kind,alpha,expected",
    [
        ("gaussian", 0.1, {"window"}),
        ("laplace", 0.1, {"window"}),
        ("row_scaled", 0.1, {"window"}),
        ("few_values", 0.3, {"exact"}),
        ("zeros", 0.3, {"zero"}),
        ("mostly_zero", 0.2, {"zero"}),
        ("spikes", 0.1, {"window", "exact"}),
        ("gaussian", 1e-9, {"digit"}),  # k = 1: the largest is alone in its bin
        ("gaussian", 0.9999, {"digit"}),  # k = n
    ],
)
@pytest.mark.parametrize("knobs", [MULTI, SPREAD], ids=["one-program", "spread"])
def test_two_pass_modes_match_the_reference(kind, alpha, expected, knobs):
    """Every selection mode of the two-pass path is exact: Gaussian, Laplace and row-scaled
    momenta, few distinct values, zeros, spikes, k = 1 and k = n (odd sizes, several steps),
    with the fallback and the candidates resolved by one program per segment or spread over
    many."""
    shapes = [(3000,), (37, 100), (5003,)]
    ps, ms, vs, steps = _tensors(shapes)
    ref_p = [p.detach().cpu().clone() for p in ps]
    ref_state = [{} for _ in shapes]
    gen = torch.Generator().manual_seed(5)
    launch._debug_capture = seen = []
    try:
        with launch.config(**knobs):
            for it in range(5):
                grads = _momenta(kind, shapes, it, gen)
                before = [p.detach().cpu().clone() for p in ps]
                _run("topk_momentum", ps, ms, vs, steps, grads, alpha=alpha)
                for i, p in enumerate(ps):
                    mask = reference_step(
                        ref_p[i],
                        grads[i].cpu(),
                        ref_state[i],
                        selection="topk_momentum",
                        alpha=alpha,
                        block_size=None,
                        mask_weight_decay=True,
                        seed=7,
                        tensor_index=3 * i + 1,
                        hash_counter=None,
                        **HP,
                    )
                    moved = p.detach().cpu() != before[i]
                    assert torch.equal(moved, mask), f"step {it}, tensor {i}: selection differs"
                    torch.testing.assert_close(
                        p.detach().cpu().double(), ref_p[i].double(), rtol=2e-6, atol=2e-6
                    )
    finally:
        launch._debug_capture = None
    modes = {MODES[int(m)] for rec in seen[1:] for m in rec["sst"][0].cpu()}  # after step 1
    assert expected <= modes, f"modes {modes}, expected {expected} among them"


@pytest.mark.parametrize("knobs", [MULTI, SPREAD], ids=["one-program", "spread"])
def test_capacity_overflow_takes_the_exact_fallback(knobs):
    launch._debug_capture = seen = []
    try:
        with launch.config(**dict(knobs, cand_frac=1e-9, cand_min=1)):
            _compare_with_reference("topk_momentum", [(3000,), (5, 123)], alpha=0.2, steps_n=3)
            _compare_with_reference("random_exact", [(3000,)], alpha=0.2, steps_n=1)
    finally:
        launch._debug_capture = None
    # the momentum steps: every boundary bin is fuller than one entry
    assert all(rec["sst"][0].cpu().tolist() == [3, 3] for rec in seen[:3])


@pytest.mark.parametrize("knobs", [MULTI, SPREAD], ids=["one-program", "spread"])
def test_window_follows_the_threshold(knobs):
    # from the second step on, Gaussian momenta resolve in the window: no fallback
    launch._debug_capture = seen = []
    try:
        with launch.config(**knobs):
            _compare_with_reference("topk_momentum", [(3000,), (5, 1230)], alpha=0.1, steps_n=4)
            _compare_with_reference("random_exact", [(3000,)], alpha=0.1, steps_n=2)
    finally:
        launch._debug_capture = None
    later = [rec for i, rec in enumerate(seen) if i not in (0, 4)]
    assert all(int(m) == 0 for rec in later for m in rec["sst"][0].cpu())


def test_many_param_groups_keep_their_windows():
    """A workspace lives with its optimizer state, not in a bounded cache: with more groups
    than any cache size, each still finds its window from the second step on."""
    groups = [_tensors([(300,)], seed=i) for i in range(66)]
    gen = torch.Generator().manual_seed(9)
    launch._debug_capture = seen = []
    try:
        with launch.config(**MULTI):
            for _ in range(2):  # |m| ~ 0.1: outside the first step's default window
                seen.clear()
                for ps, ms, vs, steps in groups:
                    _run("topk_momentum", ps, ms, vs, steps, [torch.randn(300, generator=gen).to(DEVICE)])
    finally:
        launch._debug_capture = None
    assert len(seen) == 66 and all(int(rec["sst"][0][0]) in (0, 1) for rec in seen)  # window or whole bin


def test_a_workspace_goes_with_its_step_counters():
    from maskopt.kernels import plan as kernel_plan

    ps, ms, vs, steps = _tensors([(3000,)])
    with launch.config(**MULTI):
        _run("topk_momentum", ps, ms, vs, steps, _grads(ps, 0))
        anchor = id(steps[0])
        assert anchor in kernel_plan.WORKSPACES
        del steps
        assert anchor not in kernel_plan.WORKSPACES


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("selection", ["topk_momentum", "random"])
def test_half_precision_params(dtype, selection):
    hp = dict(HP, lr=0.05)  # updates larger than a 16-bit ulp (the interpreter truncates casts)
    with launch.config(**MULTI):
        _compare_with_reference(selection, [(3000,), (5, 123), (100,)], dtype=dtype, alpha=0.2, hp=hp)


def test_mixed_dtypes_in_one_call():
    shapes = [(3000,), (5, 123), (600,), (4097,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    ps, ms, vs, steps = _tensors(shapes, dtypes)
    ref = [p.clone() for p in ps]
    rm, rv, rs = [m.clone() for m in ms], [v.clone() for v in vs], [s.clone() for s in steps]
    grads = _grads(ps, 0)
    with launch.config(**MULTI):
        _run("topk_momentum", ps, ms, vs, steps, grads, hp=dict(HP, lr=0.05))
        for i in range(len(ps)):  # one tensor at a time: same result
            _run("topk_momentum", [ref[i]], [rm[i]], [rv[i]], [rs[i]], [grads[i]], hp=dict(HP, lr=0.05))
    for a, b in zip(ps + ms + vs + steps, ref + rm + rv + rs, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------- PyTorch path


@pytest.mark.parametrize("selection", ["topk_momentum", "topk_gradient", "random", "random_exact", "all"])
def test_matches_pytorch_path(selection):
    shapes = [(3000,), (5, 123), (1,), (0,), (4097,)]
    a = _tensors(shapes)
    b = [[x.clone() for x in lst] for lst in a]
    with launch.config(**MULTI):
        for it in range(2):
            grads = _grads(a[0], it)
            before_a = [p.clone() for p in a[0]]
            before_b = [p.clone() for p in b[0]]
            _run(selection, *a, grads, alpha=0.2, hash_counter=None)
            _run(selection, *b, grads, alpha=0.2, fn=masked_adam_)
            for pa, pb, a0, b0 in zip(a[0], b[0], before_a, before_b, strict=True):
                assert torch.equal(pa != a0, pb != b0), "masks differ between the fused and PyTorch paths"
                torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)
    for x, y in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    for x, y in zip(a[2] + a[3], b[2] + b[3], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("selection", ["topk_momentum", "topk_gradient", "random", "random_exact", "all"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_bf16_moments_match_the_pytorch_path(selection, pdtype):
    """moment_dtype=bfloat16: both paths round the fp32 moments to nearest as they store them,
    then select and update from the stored values."""
    shapes = [(3000,), (5, 123), (1,), (4097,)]
    a = _tensors(shapes, pdtype)
    a = (a[0], [m.bfloat16() for m in a[1]], [v.bfloat16() for v in a[2]], a[3])
    b = [[x.clone() for x in lst] for lst in a]
    hp = dict(HP, lr=0.05)
    with launch.config(**MULTI):
        for it in range(3):
            grads = _grads(a[0], it)
            before_a, before_b = [p.clone() for p in a[0]], [p.clone() for p in b[0]]
            _run(selection, *a, grads, alpha=0.2, hp=hp)
            _run(selection, *b, grads, alpha=0.2, hp=hp, fn=masked_adam_)
            for pa, pb, a0, b0 in zip(a[0], b[0], before_a, before_b, strict=True):
                if pdtype == torch.float32:  # (a 16-bit entry may round back to itself)
                    assert torch.equal(pa != a0, pb != b0), "the two paths moved different entries"
                tol = 2e-6 if pdtype == torch.float32 else 1.6e-2
                torch.testing.assert_close(pa, pb, rtol=tol, atol=tol)
    for x, y in zip(a[1] + a[2], b[1] + b[2], strict=True):
        assert x.dtype == torch.bfloat16
        # rarely and by about one bf16 ulp: the fp32 moments may differ in their last bit
        # (multiply-add here, lerp there: docs/semantics.md), which can flip a rounding; the
        # difference then decays with the moment
        scale = float(y.float().abs().max()) if y.numel() else 0.0
        torch.testing.assert_close(x.float(), y.float(), rtol=8e-3, atol=scale / 128)
        assert (x != y).float().mean() <= 1e-2


# --------------------------------------------------------------------------------------- options


def test_hash_counter_and_unmasked_decay():
    with launch.config(**SMALL):
        _compare_with_reference("random", [(3000,), (5, 123)], alpha=0.3, hash_counter=5, mwd=False)
    with launch.config(**MULTI):
        _compare_with_reference("topk_momentum", [(3000,), (7,)], alpha=0.1, mwd=False, steps_n=1)


def test_random_mask_is_the_counter_hash():
    n = 5000
    ps, ms, vs, steps = _tensors([(n,)])
    before = ps[0].clone()
    _run("random", ps, ms, vs, steps, _grads(ps, 0), alpha=0.3, seed=11, hash_counter=None)
    u = _hash.hash_keys(n, _hash.stream_key(11, 1, 1))
    expected = (u < _hash.threshold(0.3)).to(DEVICE)
    assert torch.equal(ps[0] != before, expected)


def test_grad_scaler_protocol(layout):
    shapes = [(3000,), (5, 123), (0,)]
    a = _tensors(shapes)
    grads = _grads(a[0], 0)
    snap = [[x.clone() for x in lst] for lst in a]
    # found_inf: nothing changes, step counters included
    _run(
        "topk_momentum",
        *a,
        [g * 1024 for g in grads],
        grad_scale=torch.tensor([1024.0], device=DEVICE),
        found_inf=torch.tensor([1.0], device=DEVICE),
    )
    for x, y in zip(sum(a, []), sum(snap, []), strict=True):
        assert torch.equal(x, y)
    # a power-of-two scale divides out exactly: same bits as the unscaled step
    b = [[x.clone() for x in lst] for lst in a]
    for sel in ("topk_momentum", "topk_gradient", "random"):
        _run(
            sel,
            *a,
            [g * 1024 for g in grads],
            grad_scale=torch.tensor([1024.0], device=DEVICE),
            found_inf=torch.tensor([0.0], device=DEVICE),
        )
        _run(sel, *b, grads)
    for x, y in zip(sum(a, []), sum(b, []), strict=True):
        assert torch.equal(x, y)


def test_lr0_zero_grad_changes_no_parameter():
    ps, ms, vs, steps = _tensors([(3000,), (5000,)])
    before = [p.clone() for p in ps]
    with launch.config(**SMALL):
        _run("topk_momentum", ps, ms, vs, steps, [torch.zeros_like(p) for p in ps], hp=dict(HP, lr=0.0))
    assert all(torch.equal(p, b) for p, b in zip(ps, before, strict=True))
    assert [s.item() for s in steps] == [1.0, 1.0]


KERNELS = (
    "prologue_kernel",
    "dense_step_kernel",
    "local_step_kernel",
    "moments_window_kernel",
    "window_select_kernel",
    "exact_select_kernel",
    "data_level_kernel",
    "level_select_kernel",
    "apply_compact_kernel",
    "cand_level_kernel",
    "cand_update_kernel",
    "resolve_kernel",
)


@pytest.fixture
def count_launches(monkeypatch):
    calls = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            calls.append(self.name)
            return self.kernel[grid]

    for name in KERNELS:
        monkeypatch.setattr(launch, name, Counting(name, getattr(launch, name)))
    return calls


@pytest.mark.parametrize("selection", ["topk_momentum", "random_exact", "random", "all"])
def test_launches_per_step_do_not_grow_with_tensors(selection, count_launches):
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 600, (100,), generator=gen).tolist() + [5000, 9000]
    with launch.config(chunk=1024, local_max=512, local_tile=8192):
        _compare_with_reference(selection, [(n,) for n in sizes], alpha=0.2, steps_n=1)
    # top-k: prologue, the local pass for short and for longer rows, then the five launches of
    # the two-pass path; dense: prologue and one pass
    assert len(count_launches) == (8 if selection.endswith(("momentum", "exact")) else 2), count_launches


@pytest.mark.parametrize("selection", ["topk_momentum", "random_exact"])
def test_spread_selects_launch_a_fixed_number_of_times(selection, count_launches):
    """Spread over many programs, a step's launches still do not depend on the data or the
    number of tensors: the 8 fallback levels and the 7 candidate levels (a select after each),
    and the candidates' update, replace the one-program fallback and resolve's select."""
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 600, (60,), generator=gen).tolist() + [5000, 9000]
    with launch.config(
        chunk=1024, local_max=512, local_tile=8192, spread_min=4096, cand_block=64, resolve_tile=16
    ):
        _compare_with_reference(selection, [(n,) for n in sizes], alpha=0.2, steps_n=2)
    per_step = count_launches[: len(count_launches) // 2]
    assert per_step == count_launches[len(count_launches) // 2 :]
    assert len(per_step) == 3 + 2 + 8 * 2 + 1 + 7 * 2 + 2, per_step
    assert "exact_select_kernel" not in per_step
    assert per_step.count("data_level_kernel") == 8 and per_step.count("cand_level_kernel") == 7


def test_spread_min_picks_the_path_per_call():
    """A call spreads its selects when it holds a segment of at least ``spread_min`` entries
    (the default: 2**20), whatever its other segments; shorter calls keep one program per
    segment."""
    from maskopt.kernels.plan import plan_for

    cfg = launch.get_config()
    for numels, spread in (([1 << 20], True), ([(1 << 20) - 1, 5000], False), ([5000, 1 << 21], True)):
        plan, _ = plan_for(numels, "topk_momentum", 0.1, None, torch.device("cpu"), cfg)
        assert plan.spread is spread, numels
        if spread:  # every candidate of every segment is in exactly one block
            seg, first = plan.btab
            for s in range(plan.n_seg):
                cap = int(plan.stab[1, s])
                assert first[seg == s].tolist() == list(range(0, cap, cfg.cand_block))


def _refuse_blocking_transfers(monkeypatch):
    """Make every host synchronisation raise: reading a device value back, and copying a host
    tensor to the device without ``non_blocking=True`` (from pageable memory that waits for
    the stream). On CPU every tensor is a host tensor, so any such copy counts."""

    def refuse(*args, **kwargs):
        raise AssertionError("a fused step synchronised with the host")

    for name in ("item", "cpu", "cuda", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    real_to, real_copy = torch.Tensor.to, torch.Tensor.copy_
    real_tensor, real_as_tensor = torch.tensor, torch.as_tensor

    def to(self, *args, **kwargs):
        moves = "device" in kwargs or any(not isinstance(a, torch.dtype) for a in args)
        if moves and self.device.type == "cpu" and not kwargs.get("non_blocking", False):
            raise AssertionError(f"a fused step copied a host tensor to a device, blocking: .to{args}")
        return real_to(self, *args, **kwargs)

    def copy_(self, src, non_blocking=False):
        if src.device.type == "cpu" and not non_blocking:
            raise AssertionError("a fused step copied a host tensor to a device, blocking: copy_")
        return real_copy(self, src, non_blocking)

    def make(real):
        def created_on_a_device(data, *args, **kwargs):
            if kwargs.get("device") is not None:
                raise AssertionError("a fused step built a device tensor from host data")
            return real(data, *args, **kwargs)

        return created_on_a_device

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    monkeypatch.setattr(torch, "tensor", make(real_tensor))
    monkeypatch.setattr(torch, "as_tensor", make(real_as_tensor))


def test_a_fused_step_never_synchronises_with_the_host(monkeypatch):
    """No value read back and no blocking host-to-device copy, also when every step brings
    new gradient tensors (their addresses reach the device through a pinned buffer)."""
    shapes = [(3000,), (5, 123), (40,)]
    ps, ms, vs, steps = _tensors(shapes)
    selections = ("topk_momentum", "topk_gradient", "random_exact", "random")
    fresh = [[_grads(ps, i) for i in range(2)] for _ in selections]  # new tensors every step
    scaler = dict(grad_scale=torch.ones(1, device=DEVICE), found_inf=torch.zeros(1, device=DEVICE))
    with launch.config(**MULTI):
        for selection in selections:
            _run(selection, ps, ms, vs, steps, _grads(ps, 0), **scaler)  # plans and workspaces
        _refuse_blocking_transfers(monkeypatch)
        for selection, grads in zip(selections, fresh, strict=True):
            for g in grads:
                _run(selection, ps, ms, vs, steps, g, **scaler)
        monkeypatch.undo()


def test_argument_errors():
    ps, ms, vs, steps = _tensors([(4, 6)])
    g = torch.randn(6, 4, device=DEVICE).t()
    with pytest.raises(ValueError, match="contiguous"):
        _run("topk_momentum", ps, ms, vs, steps, [g])
    with pytest.raises(ValueError, match="selection"):
        _run("top", ps, ms, vs, steps, [g.contiguous()])
    with pytest.raises(TypeError, match="float32"):
        _run("all", ps, [m.double() for m in ms], vs, steps, [g.contiguous()])
    with pytest.raises(TypeError, match="dtype"):
        _run("all", ps, ms, vs, steps, [g.contiguous().half()])
    with pytest.raises(ValueError, match="alpha"):
        _run("random", ps, ms, vs, steps, [g.contiguous()], alpha=0.0)


@pytest.mark.parametrize("selection", ["topk_momentum", "topk_gradient"])
@pytest.mark.parametrize("knobs", [SMALL, MULTI], ids=["single", "multi"])
def test_nan_ranks_largest_and_exactly_k_move(selection, knobs):
    """NaN scores rank above every number (all NaNs tie, lowest index first): exactly k
    entries move, NaN ones first, and the PyTorch path selects the same entries."""
    shapes = [(3000,), (5, 123), (16,)]
    a, b = _tensors(shapes), _tensors(shapes)
    grads = _grads(a[0], 0)
    for g in grads:  # NaNs of different payloads, more of them than k in the last tensor
        flat = g.view(-1)
        flat[: max(1, flat.numel() // 20)] = float("nan")
        flat[-3:] = -float("nan")
        flat[1] = float("inf")
    grads[2].view(-1)[:12] = float("nan")
    with launch.config(**knobs):
        before = [p.detach().cpu().clone() for p in a[0]]
        _run(selection, *a, grads, alpha=0.25)
        _run(selection, *b, grads, alpha=0.25, fn=masked_adam_)
    for i, (pa, pb, p0) in enumerate(zip(a[0], b[0], before, strict=True)):
        moved_a = (pa.cpu() != p0) | pa.cpu().isnan()
        moved_b = (pb.cpu() != p0) | pb.cpu().isnan()
        assert torch.equal(moved_a, moved_b), f"tensor {i}: the two paths moved different entries"
        k = topk_count(p0.numel(), 0.25)
        assert int(moved_a.sum()) == k, f"tensor {i}: {int(moved_a.sum())} entries moved, expected {k}"
        nan_at = grads[i].cpu().view(-1).isnan().nonzero().view(-1)
        expected_nan_moves = nan_at[:k]
        assert bool(moved_a.view(-1)[expected_nan_moves].all()), (
            f"tensor {i}: a NaN entry was not selected first"
        )


# --------------------------------------------------------------------------------------- optimizers


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(70, 90), torch.nn.LayerNorm(90), torch.nn.Linear(90, 5)).to(
        DEVICE
    )


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("MoFO", dict(alpha=0.1)),
        ("MoFO", dict(alpha=0.2, filter="gradient", block_size=500)),
        ("RandomBCD", dict(alpha=0.2, seed=3)),
        ("RandomBCD", dict(alpha=0.2, seed=3, exact=True)),
        ("MoFO", dict(alpha=0.1, moment_dtype=torch.bfloat16)),
    ],
)
def test_optimizer_fused_equals_pytorch_path(name, kwargs):
    maskopt = pytest.importorskip("maskopt")
    cls = getattr(maskopt, name)
    models = [_model(), _model()]
    opts = [
        cls(m.parameters(), lr=1e-2, weight_decay=0.1, fused=f, **kwargs)
        for m, f in zip(models, (True, False), strict=True)
    ]
    x = torch.randn(16, 70, device=DEVICE)
    with launch.config(**MULTI):
        for _ in range(2):
            before = [[p.detach().clone() for p in m.parameters()] for m in models]
            for m, o in zip(models, opts, strict=True):
                o.zero_grad()
                m(x).square().mean().backward()
                o.step()
            for pa, pb, a0, b0 in zip(models[0].parameters(), models[1].parameters(), *before, strict=True):
                assert torch.equal(pa != a0, pb != b0), "masks differ between fused=True and fused=False"
                torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)


def test_halfadam_fused_equals_pytorch_path():
    maskopt = pytest.importorskip("maskopt")
    models = [_model(), _model()]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = [
            maskopt.HalfAdam(m.parameters(), lr=1e-2, weight_decay=0.1, fused=f, strategy=s, seed=2)
            for m, f, s in zip(models, (True, False), ("parameter", "parameter"), strict=True)
        ]
    x = torch.randn(16, 70, device=DEVICE)
    for _ in range(2):
        for m, o in zip(models, opts, strict=True):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for pa, pb in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not _CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("MoFO", dict(alpha=0.1)),
        ("MoFO", dict(alpha=0.1, filter="gradient")),
        ("RandomBCD", dict(alpha=0.2, seed=3)),
        ("HalfAdam", dict(seed=2)),
    ],
)
def test_a_captured_step_replays_like_the_eager_step(name, kwargs):
    maskopt = pytest.importorskip("maskopt")
    models = [_model(), _model()]
    opts = [
        getattr(maskopt, name)(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True, **kwargs)
        for m in models
    ]
    params = [list(m.parameters()) for m in models]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    grads = [[torch.randn(p.shape, device=DEVICE, generator=gen) for p in params[0]] for _ in range(6)]
    for ps in params:
        for p in ps:
            p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: plans, workspaces and compiled kernels
        for step in range(2):
            for ps, opt in zip(params, opts, strict=True):
                for p, g in zip(ps, grads[step], strict=True):
                    p.grad.copy_(g)
                opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[1].step()
    for step in range(2, 6):
        for p, g in zip(params[0], grads[step], strict=True):
            p.grad.copy_(g)
        opts[0].step()
        for p, g in zip(params[1], grads[step], strict=True):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(*params, strict=True):
        assert torch.equal(a, b)


def test_a_refused_kernel_config_changes_nothing():
    before = launch.get_config()
    for changes, named in (
        (dict(cand_block=24), "cand_block must be a power of two"),
        (dict(resolve_tile=8), "resolve_tile must be a power of two"),
        (dict(cand_block=512, resolve_tile=1024), "cand_block must be >= resolve_tile"),
    ):
        with pytest.raises(ValueError, match=named):
            launch.set_config(**changes)
        assert launch.get_config() is before
