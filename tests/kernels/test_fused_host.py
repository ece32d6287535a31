"""The host side of the fused path: every tensor checked or routed before the first launch,
one kernel call per device, exact steps after an exception at any launch, device tables that
live with their workspace (CUDA graphs) and no blocking host-to-device copy.

Runs where ``test_kernels.py`` runs (the Triton interpreter on CPU, or CUDA), with its set-up.
"""

from __future__ import annotations

import re
import weakref

import pytest
import torch

pytest.importorskip("triton")

import test_kernels
from test_kernels import DEVICE, HP, MULTI, SPREAD, _grads, _run, _tensors, launch

import maskopt
from maskopt import functional
from maskopt.kernels import plan as kernel_plan
from maskopt.selection import topk_masks

pytestmark = test_kernels.pytestmark


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    test_kernels._set_env(test_kernels._TEST_ENV)
    yield
    test_kernels._set_env(test_kernels._ORIGINAL_ENV)


@pytest.fixture(autouse=True)
def _multi_pass():
    with launch.config(**MULTI):
        yield


NO_DECAY = dict(HP, weight_decay=0.0)  # every selected entry moves, no other one does


def _snapshot(opt):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {
        p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()
    }
    return params, state


def _same(a, b):
    return a.device.type == "meta" or torch.equal(a, b)  # (meta tensors hold no values)


def _assert_unchanged(opt, snapshot):
    params, state = snapshot
    now = [p.detach() for g in opt.param_groups for p in g["params"]]
    assert all(_same(a, b) for a, b in zip(now, params, strict=True)), "a parameter changed"
    assert len(opt.state) == len(state), "state was created"
    for p, saved in state.items():
        for key, value in saved.items():
            assert _same(opt.state[p][key], value), f"state {key!r} changed"


def _param(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype).to(DEVICE))


# --------------------------------------------------------------------------------------- planning


def _channels_last():
    return torch.nn.Parameter(torch.randn(4, 3, 3, 3, device=DEVICE).to(memory_format=torch.channels_last))


def _transposed():
    return torch.nn.Parameter(torch.randn(6, 40, device=DEVICE).t())


def _transposed_grad(p):
    p.grad = torch.randn(tuple(reversed(p.shape)), device=DEVICE).t()


def _half_grad(p):
    p.grad_dtype = None  # torch refuses a gradient of another dtype unless told
    p.grad = torch.randn(p.shape, device=DEVICE).half()


def _strided_exp_avg(opt, p):
    state = opt.state[p]
    state["exp_avg"] = state["exp_avg"].t().contiguous().t()  # same values, column-major


BAD_TENSORS = {
    "channels_last": (_channels_last, None, ValueError, "channels_last"),
    "transposed": (_transposed, None, ValueError, "not contiguous"),
    "transposed grad": (
        lambda: _param(40, 6, seed=3),
        _transposed_grad,
        ValueError,
        "gradient is not contiguous",
    ),
    "float64": (lambda: _param(50, dtype=torch.float64), None, ValueError, "float64"),
    "grad of another dtype": (
        lambda: _param(50),
        _half_grad,
        ValueError,
        "gradient is torch.float16",
    ),
    "strided exp_avg": (lambda: _param(40, 6, seed=4), "state", ValueError, "exp_avg is not contiguous"),
    "no fused path on its device": (
        lambda: torch.nn.Parameter(torch.randn(50, device="meta")),
        None,
        RuntimeError,
        "meta",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_fused_true_refuses_what_the_kernels_cannot_take_before_anything_changes(case):
    """fused=True: a tensor the kernels cannot take is refused, naming it and the reason, before
    any group is stepped or any state created (an earlier, fine group included)."""
    make, spoil, error, reason = BAD_TENSORS[case]
    fine = [_param(300), _param(40, seed=1)]
    opt = maskopt.MoFO([{"params": fine}], lr=1e-2, alpha=0.1, fused=True)
    bad = make()
    opt.add_param_group({"params": [bad, _param(30, seed=2)]})
    for p in fine:
        p.grad = torch.randn_like(p)
    opt.step()  # the fine group has state and counters
    bad.grad = torch.randn_like(bad)
    if spoil == "state":
        opt.step()
        _strided_exp_avg(opt, bad)
    elif spoil is not None:
        spoil(bad)
    for p in opt.param_groups[1]["params"][1:]:
        p.grad = torch.randn_like(p)
    snapshot = _snapshot(opt)
    with pytest.raises(Exception) as refused:
        opt.step()
    _assert_unchanged(opt, snapshot)
    assert isinstance(refused.value, error), refused.value
    assert re.search(rf"MoFO: fused=True cannot step parameter 2: .*{reason}", str(refused.value)), (
        refused.value
    )


@pytest.fixture
def calls(monkeypatch):
    """Every call the Triton entry point and the PyTorch path get: (path, params)."""
    from maskopt import kernels

    seen = []
    fused_step, torch_step = kernels.fused_adam_step_, functional.masked_adam_

    def fused(params, *args, **kwargs):
        seen.append(("fused", list(params)))
        fused_step(params, *args, **kwargs)

    def pytorch(params, *args, **kwargs):
        seen.append(("pytorch", list(params)))
        torch_step(params, *args, **kwargs)

    monkeypatch.setattr(kernels, "fused_adam_step_", fused)
    monkeypatch.setattr(functional, "masked_adam_", pytorch)
    return seen


def _routed_model():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(DEVICE).to(memory_format=torch.channels_last)
    linear = torch.nn.Linear(36, 50).to(DEVICE)
    return conv, linear


def test_fused_none_sends_what_the_kernels_cannot_take_to_the_pytorch_path(monkeypatch, calls):
    """fused=None (with the default on, as it will be once a GPU has run the kernels): a
    channels_last weight and a transposed gradient take the PyTorch path, the rest of their
    group the Triton path, and the step equals fused=False's."""
    monkeypatch.setattr(functional, "fused_by_default", lambda p: functional.fused_available(p.device))
    models = [_routed_model(), _routed_model()]
    opts = [
        maskopt.MoFO([p for m in models[i] for p in m.parameters()], lr=1e-2, alpha=0.2, fused=f)
        for i, f in enumerate((None, False))
    ]
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    for _ in range(2):
        before = [[p.detach().clone() for m in ms for p in m.parameters()] for ms in models]
        for (conv, linear), opt in zip(models, opts, strict=True):
            opt.zero_grad()
            linear(conv(x).flatten(1)[:, :36]).square().mean().backward()
            w = linear.weight
            w.grad = w.grad.t().contiguous().t()  # same values, column-major
        calls.clear()
        opts[0].step()
        conv, linear = models[0]
        assert sorted((path, [id(p) for p in ps]) for path, ps in calls) == [
            ("fused", [id(conv.bias), id(linear.bias)]),
            ("pytorch", [id(conv.weight), id(linear.weight)]),
        ]
        opts[1].step()
        after = [[p.detach() for m in ms for p in m.parameters()] for ms in models]
        for a, b, a0, b0 in zip(*after, *before, strict=True):
            assert torch.equal(a != a0, b != b0), "the two optimizers moved different entries"
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------- devices


def test_a_group_over_two_devices_steps_each_device_with_its_own_call(monkeypatch):
    """One param group on two devices ('meta' stands in for a second GPU): one kernel call per
    device with only that device's tensors (GradScaler's tensors copied to it), and this
    device's tensors step exactly as in a group of their own."""
    real_available = functional.fused_available

    def available(device):
        return torch.device(device).type == "meta" or real_available(device)

    monkeypatch.setattr(functional, "fused_available", available)
    monkeypatch.setattr(maskopt.optimizer, "fused_available", available)
    local = [_param(300), _param(5, 12, seed=1)]
    remote = [
        torch.nn.Parameter(torch.zeros(200, device="meta")),
        torch.nn.Parameter(torch.zeros(7, device="meta")),
    ]
    alone = [p.detach().clone().requires_grad_() for p in local]
    group = [local[0], remote[0], local[1], remote[1]]
    opt = maskopt.MoFO(group, lr=1e-2, alpha=0.2, fused=True)
    opt_alone = maskopt.MoFO(alone, lr=1e-2, alpha=0.2, fused=True)

    from maskopt import kernels

    recorded = []
    forward = kernels.fused_adam_step_

    def per_device(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs):
        tensors = [*params, *grads, *exp_avgs, *exp_avg_sqs, *steps]
        scaler = [t for t in (kwargs["grad_scale"], kwargs["found_inf"]) if t is not None]
        recorded.append(({t.device for t in tensors + scaler}, [tuple(p.shape) for p in params]))
        if params[0].device.type != "meta":
            forward(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs)

    monkeypatch.setattr(kernels, "fused_adam_step_", per_device)
    for step in range(2):
        for p, q in zip(local, alone, strict=True):
            p.grad = _grads([p], step)[0]
            q.grad = p.grad.clone()
        for p in remote:
            p.grad = torch.zeros_like(p)
        opt.grad_scale, opt.found_inf = torch.ones(1, device=DEVICE), torch.zeros(1, device=DEVICE)
        recorded.clear()
        opt.step()
        assert recorded == [
            ({local[0].device}, [(300,), (5, 12)]),
            ({torch.device("meta")}, [(200,), (7,)]),
        ], recorded
        opt_alone.step()
    for p, q in zip(local, alone, strict=True):
        assert torch.equal(p, q)
        assert all(
            torch.equal(opt.state[p][k], opt_alone.state[q][k]) for k in ("exp_avg", "exp_avg_sq", "step")
        )


# --------------------------------------------------------------------------------------- exceptions

KERNELS = test_kernels.KERNELS
SHAPES = [(1500,), (5, 123), (40,)]  # two two-pass segments and a single-pass one
LAUNCHES = 7  # prologue, single-pass, pass 1, window select, fallback, pass 2, resolve


class _Interrupt(BaseException):
    """Stands in for Ctrl-C, a kernel's compile failure or a failed all-reduce."""


def _fail_at(monkeypatch, failing: int) -> list[str]:
    """Make the ``failing``-th launch from now raise (never, if there are fewer)."""
    launched: list[str] = []

    class Failing:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            if len(launched) == failing:
                raise _Interrupt(f"launch {failing} ({self.name})")
            launched.append(self.name)
            return self.kernel[grid]

    for name in KERNELS:
        monkeypatch.setattr(launch, name, Failing(name, getattr(launch, name)))
    return launched


# the spread path's 37 launches: prologue, single-pass, pass 1, window select, 8 x (fallback
# level, select), pass 2, 7 x (candidate level, select), the candidates' update, resolve
SPREAD_LAUNCHES = 37


@pytest.mark.parametrize(
    "failing,knobs",
    [(i, MULTI) for i in range(LAUNCHES)] + [(i, SPREAD) for i in (4, 5, 11, 20, 21, 23, 34, 35, 36)],
    ids=[f"one-program-{i}" for i in range(LAUNCHES)]
    + [f"spread-{i}" for i in (4, 5, 11, 20, 21, 23, 34, 35, 36)],
)
def test_after_an_exception_at_any_launch_every_step_moves_exactly_the_top_k(monkeypatch, failing, knobs):
    """A step interrupted at any of its launches may leave counts in the persistent
    histograms; every later step still moves exactly the top-k of |exp_avg| (lowest index
    first among ties). The spread path is interrupted inside its fallback levels, at pass 2,
    inside its candidate levels, at the candidates' update and at the resolve."""
    with launch.config(**knobs):
        _interrupted_then_exact(monkeypatch, failing, LAUNCHES if knobs is MULTI else SPREAD_LAUNCHES)


def _interrupted_then_exact(monkeypatch, failing, launches):
    ps, ms, vs, steps = _tensors(SHAPES)
    _run("topk_momentum", ps, ms, vs, steps, _grads(ps, 0), alpha=0.1, hp=NO_DECAY)
    with monkeypatch.context() as patch:
        launched = _fail_at(patch, failing)
        with pytest.raises(_Interrupt):
            _run("topk_momentum", ps, ms, vs, steps, _grads(ps, 1), alpha=0.1, hp=NO_DECAY)
    assert len(launched) == failing
    for it in (2, 3):
        with monkeypatch.context() as patch:
            launched = _fail_at(patch, launches)
            before = [p.clone() for p in ps]
            _run("topk_momentum", ps, ms, vs, steps, _grads(ps, it), alpha=0.1, hp=NO_DECAY)
        assert len(launched) == launches, launched
        for i, (p, p0, m) in enumerate(zip(ps, before, ms, strict=True)):
            expected = topk_masks([m.abs().cpu()], 0.1)[0]
            moved = (p != p0).cpu()
            assert torch.equal(moved, expected), (
                f"step {it}, tensor {i}: {int(moved.sum())} entries moved, {int(expected.sum())} expected"
            )


# --------------------------------------------------------------------------------------- CUDA graphs


def _used_tables(monkeypatch) -> list:
    """A weak reference to the tensor table each step's prologue reads."""
    used = []

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launcher = self.kernel[grid]

            def run(table, *args, **kwargs):
                used.append(weakref.ref(table))
                return launcher(table, *args, **kwargs)

            return run

    monkeypatch.setattr(launch, "prologue_kernel", Recording(launch.prologue_kernel))
    return used


def test_the_table_a_step_points_to_lives_with_its_workspace(monkeypatch):
    """20 steps with new gradient tensors (more than any cache held), a cleared plan cache and
    a set_config: the table and plan the first step used stay alive, the same objects at the
    same addresses, updated in place (a captured step replays with them)."""
    ps, ms, vs, steps = _tensors([(1500,), (40,)])
    used = _used_tables(monkeypatch)
    _run("random", ps, ms, vs, steps, _grads(ps, 0))  # (tables work alike for every selection)
    work = kernel_plan.WORKSPACES[id(steps[0])][1]
    table, plan = used[0](), getattr(work, "plan", None)
    address, chunks = table.data_ptr(), plan and plan.ctab.data_ptr()
    for it in range(1, 21):
        grads = _grads(ps, it)
        if it == 10:
            launch.PLANS.clear()
            launch.set_config(**vars(launch.get_config()))
        _run("random", ps, ms, vs, steps, grads)
        assert used[0]() is table, "the table of the first step was freed"
        assert used[-1]() is table and table.data_ptr() == address
        assert table[1].tolist() == [g.data_ptr() for g in grads]  # this step's gradients
        assert kernel_plan.WORKSPACES[id(steps[0])][1] is work
        assert work.plan is plan and plan.ctab.data_ptr() == chunks


def test_a_captured_step_refuses_to_write_a_table(monkeypatch):
    """Under CUDA graph capture (simulated) a step whose tensors have no state, no workspace
    or new gradient addresses raises, naming the fix, and changes nothing; with the gradients
    at the addresses of the step before, it runs."""
    params = [_param(1500), _param(40, seed=1)]
    opt = maskopt.MoFO(params, lr=1e-2, alpha=0.1, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    capturing = pytest.raises(RuntimeError, match=r"zero_grad\(set_to_none=False\).*before capturing")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with capturing:
        opt.step()  # the first step creates state: refused
    assert len(opt.state) == 0
    monkeypatch.undo()

    opt.step()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    before = _snapshot(opt)
    opt.step()  # same gradient tensors: nothing to write
    assert not torch.equal(params[0], before[0][0])

    snapshot = _snapshot(opt)
    for p in params:
        p.grad = p.grad.clone()  # set_to_none=True gradients come back at new addresses
    with capturing:
        opt.step()
    _assert_unchanged(opt, snapshot)

    ps, ms, vs, steps = _tensors([(700,)])  # no workspace yet
    with pytest.raises(RuntimeError, match="no workspace yet"):
        _run("topk_momentum", ps, ms, vs, steps, _grads(ps, 0))
    assert int(steps[0]) == 0 and not ms[0].any()


def test_fused_none_takes_the_pytorch_path_on_cuda_until_a_gpu_has_run_the_kernels():
    """No GPU has run the current kernels: the default does not send anyone through them."""
    assert functional.FUSED_BY_DEFAULT_ON_CUDA is False
    param = torch.zeros(3, device="meta")
    assert not functional.fused_by_default(param)
