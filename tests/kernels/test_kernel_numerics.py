"""What the fused kernels compute where the interpreter and a GPU could part ways.

* Rounding: every launch compiles without floating-point contraction, and parameters are
  stored rounded to nearest even in every dtype, so the bits these interpreter tests check
  are the bits a GPU computes (the PTX side is checked by ``test_kernels_compile.py``).
* FSDP2: the window's candidate capacity is per rank, and it is what each rank compacts
  that must fit in it, so 8 ranks stay in the window where one process does (8 ranks
  simulated by threads, with the collectives done in memory).
* Counts: a histogram bin can hold more than 2**31 entries (a segment has up to 2**32).

Like ``test_kernels.py``, whose set-up this module shares, the kernels run under the Triton
interpreter on CPU (``TRITON_INTERPRET=1``), or compiled on CUDA.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

import test_kernels  # its set-up builds the kernels for this device (the interpreter on a CPU)
from test_kernels import DEVICE, HP, MULTI, launch

from maskopt.kernels import _common, fused_adam_step_, plan
from maskopt.policy import SelectionPolicy

pytestmark = test_kernels.pytestmark


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    test_kernels._set_env(test_kernels._TEST_ENV)
    yield
    test_kernels._set_env(test_kernels._ORIGINAL_ENV)


MODE_NAMES = {0: "window", 1: "digit", 2: "zero", 3: "exact"}


def _state(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes]
    ms = [torch.zeros(s, device=DEVICE) for s in shapes]
    vs = [torch.zeros(s, device=DEVICE) for s in shapes]
    steps = [torch.zeros((), device=DEVICE) for _ in shapes]
    return ps, ms, vs, steps


def _step(selection, ps, ms, vs, steps, grads, alpha=0.2, shards=None):
    fused_adam_step_(
        ps,
        grads,
        ms,
        vs,
        steps,
        policy=SelectionPolicy(selection, alpha, None, 7, None),
        mask_weight_decay=True,
        tensor_indices=list(range(len(ps))),
        grad_scale=None,
        found_inf=None,
        shards=shards,
        **HP,
    )


class _Recording:
    """A kernel whose launches are recorded: name and keyword arguments (compile options
    among them)."""

    def __init__(self, name, kernel, calls):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append((self.name, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return run


def _kernels_of_launch():
    return [name for name in vars(launch) if name.endswith("_kernel")]


# --------------------------------------------------------------------------------------- rounding


def test_every_launch_compiles_without_contraction(monkeypatch):
    """A GPU build contracts ``a*b + c`` into one FMA unless told not to; the interpreter rounds
    the product and the sum separately. Every launch must pass the option."""
    calls = []
    for name in _kernels_of_launch():
        monkeypatch.setattr(launch, name, _Recording(name, getattr(launch, name), calls))
    shapes = [(3000,), (5, 123), (40,)]
    with launch.config(**MULTI):
        for selection in ("topk_momentum", "topk_gradient", "random_exact", "random", "all"):
            ps, ms, vs, steps = _state(shapes)
            _step(selection, ps, ms, vs, steps, [torch.randn(s, device=DEVICE) for s in shapes])
    launched = {name for name, _ in calls}
    assert {"prologue_kernel", "dense_step_kernel", "local_step_kernel", "apply_compact_kernel"} <= launched
    assert launch.LAUNCH_OPTIONS == {"enable_fp_fusion": False}
    missing = sorted({name for name, kwargs in calls if kwargs.get("enable_fp_fusion") is not False})
    assert not missing, f"launched with floating-point contraction: {missing}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("selection", ["all", "random", "topk_momentum"])
def test_16_bit_parameters_are_rounded_to_nearest_even(dtype, selection):
    """A 16-bit parameter is the fp32 step's result rounded to nearest even (torch's ``.to``),
    as a GPU stores it: the interpreter's own bf16 cast truncates, so the kernels round on the
    bits. The fp32 run on the same values computes the same fp32 results (the moments, the
    selection and the update do not depend on the parameter dtype)."""
    shapes = [(3000,), (5, 123), (40,)]  # two-pass, and single-pass segments
    low = _state(shapes, dtype)
    high = ([p.float() for p in low[0]], *[[x.clone() for x in lst] for lst in low[1:]])
    gen = torch.Generator().manual_seed(3)
    with launch.config(**MULTI):
        for _ in range(2):
            for p_high, p_low in zip(high[0], low[0], strict=True):
                p_high.copy_(p_low)
            grads = [(torch.randn(s, generator=gen) * 0.3).to(dtype).to(DEVICE) for s in shapes]
            _step(selection, *low, grads)
            _step(selection, *high, [g.float() for g in grads])
            for p_low, p_high in zip(low[0], high[0], strict=True):
                expected = p_high.to(dtype)
                mismatched = int((p_low.view(torch.int16) != expected.view(torch.int16)).sum())
                assert mismatched == 0, f"{mismatched} of {p_low.numel()} entries not rounded to nearest even"
    for a, b in zip(low[1] + low[2], high[1] + high[2], strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------- FSDP2 capacity


class _SimulatedGroup:
    """``world`` ranks as threads of this process: all-reduces meet in memory, and kernel
    launches take turns (the interpreter is not thread-safe)."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=600)
        self.slots = [None] * world
        self.launching = threading.Lock()
        self.rank = threading.local()

    def all_reduce(self, tensor, sharding, op="sum"):
        self.slots[sharding.rank] = tensor.clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        result = stacked.amax(dim=0) if op == "max" else stacked.sum(dim=0)
        self.barrier.wait()  # every rank has read every slot
        tensor.copy_(result)

    def sharding_of(self, params, shards):
        offsets = tuple(int(s.offset) for s in shards)
        numels = tuple(int(s.numel) for s in shards)
        return plan.Sharding(self, self.rank.value, self.world, numels, offsets)


class _TakingTurns(_Recording):
    """A recorded kernel whose launches hold ``lock``."""

    def __init__(self, name, kernel, calls, lock):
        super().__init__(name, kernel, calls)
        self.lock = lock

    def __getitem__(self, grid):
        launch_recorded = super().__getitem__(grid)

        def run(*args, **kwargs):
            with self.lock:
                return launch_recorded(*args, **kwargs)

        return run


def _gaussian_momenta(n, steps, seed=11):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) * 1e-3 for _ in range(steps)]


def _modes(records):
    return [[MODE_NAMES[int(m)] for m in rec["sst"][0].cpu()] for rec in records]


def test_sharded_window_capacity_bounds_each_ranks_candidates(monkeypatch):
    """FSDP2 on one 8-GPU node: the boundary bin's entries over all ranks exceed one rank's
    candidate capacity (1/8 of the tensor's), but each rank compacts only its own share. So the
    window resolves at world size 8 wherever it resolves in one process, with the same result
    bit for bit."""
    world, n, steps_n = 8, 1 << 16, 3
    grads = _gaussian_momenta(n, steps_n)
    knobs = dict(chunk=4096, local_max=128, local_tile=1024)

    # one process
    single = _state([(n,)])
    launch._debug_capture = seen = []
    try:
        with launch.config(**knobs):
            for g in grads:
                _step("topk_momentum", *single, [g.to(DEVICE)], alpha=0.1)
    finally:
        launch._debug_capture = None
    assert _modes(seen[1:]) == [["window"]] * (steps_n - 1)  # from the second step on
    # its boundary bins hold more entries than one rank's capacity (n/32 over 8 ranks)
    per_rank_capacity = -(-n // 32 // world)
    boundary = [int(rec["sst"][_common.S_CCOUNT.value, 0]) for rec in seen[1:]]
    assert min(boundary) > per_rank_capacity, boundary

    # 8 ranks, rank r holding entries [r n/8, (r+1) n/8) of the same tensor
    group = _SimulatedGroup(world)
    monkeypatch.setattr(launch, "_all_reduce", group.all_reduce)
    monkeypatch.setattr(launch, "sharding_of", group.sharding_of)
    calls = []
    for name in _kernels_of_launch():
        monkeypatch.setattr(launch, name, _TakingTurns(name, getattr(launch, name), calls, group.launching))
    whole = _state([(n,)])
    local = n // world
    shards = [
        [x[r * local : (r + 1) * local].clone() if x.dim() else x.clone() for x in (t[0] for t in whole)]
        for r in range(world)
    ]
    errors = []
    launch._debug_capture = seen = []

    def rank_main(rank):
        group.rank.value = rank
        p, m, v, step = shards[rank]
        shard = SimpleNamespace(offset=rank * local, numel=n, group=group)
        try:
            with launch.config(**knobs):
                for g in grads:
                    _step(
                        "topk_momentum",
                        [p],
                        [m],
                        [v],
                        [step],
                        [g[rank * local : (rank + 1) * local].to(DEVICE)],
                        alpha=0.1,
                        shards=[shard],
                    )
        except BaseException as e:  # reported below; the other ranks time out at the barrier
            errors.append((rank, e))
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        launch._debug_capture = None
    assert not errors, errors[0]
    modes = _modes(seen)
    assert len(modes) == world * steps_n
    after_first = {m for rec in modes[world:] for m in rec}
    assert after_first == {"window"}, f"modes per step and rank: {modes}"
    for i, x in enumerate(single[:3]):  # p, m, v: the same bits as one process
        assert torch.equal(torch.cat([shards[r][i] for r in range(world)]), x[0])
    assert {"data_level_kernel", "cand_level_kernel", "level_select_kernel"} <= {name for name, _ in calls}
    assert all(kwargs.get("enable_fp_fusion") is False for _, kwargs in calls)  # as unsharded launches


# --------------------------------------------------------------------------------------- counts


def _two_pass_workspace():
    """The workspace of a one-segment two-pass step (its histogram rows as the launcher
    allocates them), the step's segment table, and the step counter that keeps it alive."""
    ps, ms, vs, steps = _state([(3000,)])
    launch._debug_capture = seen = []
    try:
        _step("topk_momentum", ps, ms, vs, steps, [torch.randn(3000, device=DEVICE)])
    finally:
        launch._debug_capture = None
    return plan.WORKSPACES[id(steps[0])][1], seen[-1]["stab"], steps


def _add_in_flushes(row, index, count):
    """``count`` added to ``row[index]`` the way pass 1's programs flush: several atomic adds,
    none over 2**30 (so a 32-bit row wraps rather than refusing the value)."""
    while count:
        part = min(count, 1 << 30)
        row[index] += part
        count -= part


@pytest.mark.parametrize(
    "case,expected_mode",
    [
        ("every |m| is zero", "zero"),  # the boundary is the zero bin, more than 2**31 entries
        ("boundary below a full bin", "window"),  # more than 2**31 entries above the boundary
    ],
)
def test_window_select_counts_past_2_31(case, expected_mode):
    """A segment of up to 2**32 entries can put more than 2**31 of them in one bin of pass 1's
    histogram; the window select must still find the boundary bin and its mode."""
    with launch.config(**MULTI):
        _select_past_2_31(case, expected_mode)


def _select_past_2_31(case, expected_mode):
    work, stab, _alive = _two_pass_workspace()
    n = (1 << 31) + (1 << 24)
    nb = 1 << launch.KernelConfig().window_bins_log2
    row = work.hist[0]
    row.zero_()
    if case == "every |m| is zero":
        k = n // 10
        _add_in_flushes(row, 0, n)
        work.zcount[0] = n  # the zeros of the segment's chunk, ranked by the select
        expected_rank = k
    else:
        boundary, population = nb // 2, 1000
        _add_in_flushes(row, boundary + 3, n - population)
        _add_in_flushes(row, boundary, population)
        k, expected_rank = n - population + 500, 500
    stab = stab.clone()
    stab[_common.G_K.value, 0] = k
    stab[_common.G_CAP.value, 0] = -(-n // 32)
    stab[_common.G_CFIRST.value, 0] = 0
    stab[_common.G_NCHUNKS.value, 0] = 1
    args = dict(
        hist=work.hist,
        hist_max=work.hist,
        sst=work.sst,
        S=1,
        stab=stab,
        zcount=work.zcount,
        ztotal=work.ztotal,
        rank=0,
        world=1,
        found_inf_ptr=work.ws,
        HAS_INF=False,
        FLOAT_KEY=True,
        FRAC=launch.KernelConfig().window_frac,
        NB_LOG2=launch.KernelConfig().window_bins_log2,
        IDXB=32,
        TOP_SHIFT=48,
        SCAN=1024,
        SHARDED=False,
    )
    kernel = launch.window_select_kernel
    kernel[(1,)](**{a: v for a, v in args.items() if a in kernel.arg_names}, **launch.LAUNCH_OPTIONS)
    sst = work.sst[:, 0].cpu()
    assert MODE_NAMES[int(sst[_common.S_MODE.value])] == expected_mode, sst.tolist()
    assert int(sst[_common.S_R.value]) == expected_rank, sst.tolist()
    if expected_mode == "window":
        assert int(sst[_common.S_DSEL.value]) == boundary
    assert int(work.hist.abs().sum()) == 0  # the select resets the row for the next step
