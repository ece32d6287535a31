"""DDP (gloo, 2 CPU processes): MoFO, RandomBCD and HalfAdam under DistributedDataParallel.

One spawn of two ranks runs every scenario (process start-up dominates the cost); each
scenario writes its result per rank to a file as soon as it is done, so a scenario that fails
or hangs only fails its own test. The spawn is guarded by a deadline: a hang terminates the
workers and fails the tests instead of blocking the run.

Each rank trains on its half of a fixed global batch; DDP averages the two half-batch
gradients, which equals the full-batch mean gradient up to summation order. So after N steps
the parameters must be bitwise equal on both ranks and match a single-process run on the
full batch to rounding.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import exit_without_interpreter_shutdown, free_port, snapshot
from _tiny_models import toy_llama
from torch import nn

from maskopt import HalfAdam, MoFO, RandomBCD

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD = 2
DEADLINE_S = 150.0  # whole spawn, all scenarios; a healthy run takes a few seconds
STEPS = 4
RTOL, ATOL = 1e-5, 1e-7


# --- models and data (deterministic, identical in every process) --------------------------------


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def mlp_batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


def mlp_loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def llama_batch(step):
    gen = torch.Generator().manual_seed(200 + step)
    ids = torch.randint(0, 32, (4, 6), generator=gen)
    return (ids,)


def llama_loss(model, batch):
    (ids,) = batch
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def half_of(batch, rank):
    """Rank ``rank``'s half of the global batch (equal halves: mean of means = full mean)."""
    return tuple(t.chunk(WORLD)[rank] for t in batch)


# --- the worker -----------------------------------------------------------------------------------


def _train(forward, opt, loss_fn, make_batch, steps, rank, first_step, after_step=None):
    """``steps`` steps; rank None means the single-process run on the full global batch."""
    for s in range(first_step, first_step + steps):
        batch = make_batch(s)
        if rank is not None:
            batch = half_of(batch, rank)
        opt.zero_grad()
        loss_fn(forward, batch).backward()
        opt.step()
        if after_step is not None:
            after_step(s)


def _scenario_elementwise(name, rank):
    """MoFO / RandomBCD: DDP vs a single-process run; params after step 1 and after STEPS."""
    make_opt = {
        "mofo": lambda ps: MoFO(ps, lr=1e-2, alpha=0.25),
        "random_bcd": lambda ps: RandomBCD(ps, lr=1e-2, alpha=0.3, seed=3),
    }[name]
    out = {}
    for tag, r in (("ddp", rank), ("single", None)):
        model = mlp()
        out[f"{tag}_init"] = snapshot(model)
        forward = nn.parallel.DistributedDataParallel(model) if r is not None else model
        opt = make_opt(model.parameters())
        first = {}
        _train(
            forward,
            opt,
            mlp_loss,
            mlp_batch,
            STEPS,
            r,
            0,
            after_step=lambda s, first=first, model=model: first.update(snapshot(model)) if s == 0 else None,
        )
        out[f"{tag}_step1"] = first
        out[f"{tag}_final"] = snapshot(model)
    return out


def _halfadam_run(rank, freeze="requires_grad", wrap=None, find_unused=False, ddp_first=False, rounds=3):
    """HalfAdam over ``rounds`` rounds of STEPS steps each, ``new_round()`` in between.

    ``wrap``: None (single process, full batch), ``"once"`` (one DDP for the whole run) or
    ``"rewrap"`` (a new DDP around the module after every ``new_round()``). ``ddp_first``:
    build the DDP before HalfAdam (whose constructor sets ``requires_grad``). Returns the params
    after every round, the trainable names per round, the steps done and the error, if any.
    """
    model = toy_llama(vocab=32)

    def wrapped():
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)

    ddp = wrapped() if wrap and ddp_first else None
    opt = HalfAdam(model.named_parameters(), lr=1e-2, seed=0, freeze=freeze)
    if ddp is None:
        ddp = wrapped() if wrap else model
    out = {"rounds": [], "trainable": [], "error": None, "steps_done": 0}

    def count(step):
        out["steps_done"] = step + 1

    try:
        for rnd in range(rounds):
            if rnd:
                opt.new_round()
                if wrap == "rewrap":
                    ddp = wrapped()
            out["trainable"].append(sorted(opt.plan.trainable))
            _train(ddp, opt, llama_loss, llama_batch, STEPS, rank if wrap else None, rnd * STEPS, count)
            out["rounds"].append(snapshot(model))
    except Exception as exc:  # recorded: the wrong recipes raise
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["final"] = snapshot(model)
    out["requires_grad"] = {n: p.requires_grad for n, p in model.named_parameters()}
    return out


HALFADAM = {
    "halfadam_mask": dict(freeze="mask", wrap="once"),
    "halfadam_rewrap": dict(wrap="rewrap"),
    # the wrong recipes last: they leave a DDP reducer in an unfinished state
    "halfadam_not_rewrapped": dict(wrap="once"),
    "halfadam_not_rewrapped_find_unused": dict(wrap="once", find_unused=True),
    "halfadam_created_after_ddp": dict(wrap="once", ddp_first=True),
}


def _scenario_halfadam(name, rank):
    return {"ddp": _halfadam_run(rank, **HALFADAM[name]), "single": _halfadam_run(None)}


SCENARIOS = {
    "mofo": _scenario_elementwise,
    "random_bcd": _scenario_elementwise,
    **{name: _scenario_halfadam for name in HALFADAM},
}


def _worker(rank, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for name, fn in SCENARIOS.items():
            try:
                result = {"result": fn(name, rank)}
            except Exception:
                result = {"crash": traceback.format_exc()}
            path = os.path.join(outdir, f"{name}.rank{rank}.pt")
            torch.save(result, path + ".tmp")
            os.replace(path + ".tmp", path)  # a killed worker leaves no half-written result
            dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_without_interpreter_shutdown()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Spawn the 2 ranks once; ``ddp_results(name)`` -> [rank0 result, rank1 result]."""
    outdir = str(tmp_path_factory.mktemp("ddp"))
    ctx = mp.get_context("spawn")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # inherited by the children
    try:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(rank, port, outdir), daemon=True) for rank in range(WORLD)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
    for p in hung:
        p.join(5)
        if p.is_alive():
            p.kill()
    status = (
        f"hung: terminated after {DEADLINE_S:.0f} s" if hung else f"exit codes {[p.exitcode for p in procs]}"
    )

    def get(name):
        results = []
        for rank in range(WORLD):
            path = os.path.join(outdir, f"{name}.rank{rank}.pt")
            if not os.path.exists(path):
                pytest.fail(f"scenario {name!r}: no result from rank {rank} (workers {status})")
            data = torch.load(path, weights_only=False)
            if "crash" in data:
                pytest.fail(f"scenario {name!r} crashed on rank {rank}:\n{data['crash']}")
            results.append(data["result"])
        return results

    return get


# --- checks ---------------------------------------------------------------------------------------


def assert_bitwise_equal(a, b, what):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{what}: {n} differs between ranks"


def assert_close(a, b, what):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{what}: {n}: {m}")


def changed(before, after):
    return {n: before[n] != after[n] for n in before}


@pytest.mark.parametrize("name", ["mofo", "random_bcd"])
def test_ddp_elementwise_optimizers_match_single_process(ddp_results, name):
    r0, r1 = ddp_results(name)
    # every rank starts from, and ends at, the same parameters
    assert_bitwise_equal(r0["ddp_init"], r1["ddp_init"], "init")
    assert_bitwise_equal(r0["ddp_step1"], r1["ddp_step1"], "after step 1")
    assert_bitwise_equal(r0["ddp_final"], r1["ddp_final"], f"after {STEPS} steps")
    # the single-process reference is the same on both ranks (deterministic)
    assert_bitwise_equal(r0["single_final"], r1["single_final"], "single-process reference")
    # and DDP on half batches matches one process on the full batch
    assert_close(r0["ddp_step1"], r0["single_step1"], "after step 1")
    assert_close(r0["ddp_final"], r0["single_final"], f"after {STEPS} steps")
    # the update really is partial, and selects the same entries as the single process
    moved_ddp = changed(r0["ddp_init"], r0["ddp_step1"])
    moved_single = changed(r0["single_init"], r0["single_step1"])
    for n in moved_ddp:
        assert torch.equal(moved_ddp[n], moved_single[n]), f"{n}: different entries moved at step 1"
    moved, total = sum(int(m.sum()) for m in moved_ddp.values()), sum(m.numel() for m in moved_ddp.values())
    assert 0 < moved < total / 2, "the update should be partial"
    if name == "mofo":  # exactly topk_count(n, 0.25) entries per tensor
        from maskopt.selection import topk_count

        for n, m in moved_ddp.items():
            assert int(m.sum()) == topk_count(m.numel(), 0.25), n


def assert_ranks_differ(a, b, what):
    assert any(not torch.equal(a[n], b[n]) for n in a), f"{what}: expected the ranks to have diverged"


def test_ddp_halfadam_freeze_mask_survives_new_round(ddp_results):
    """freeze="mask": one DDP wrapper for the whole run; new_round() needs nothing else."""
    r0, r1 = ddp_results("halfadam_mask")
    for r in (r0, r1):
        assert r["ddp"]["error"] is None, r["ddp"]["error"]
        assert all(r["ddp"]["requires_grad"].values())
    assert r0["ddp"]["trainable"] == r1["ddp"]["trainable"] == r0["single"]["trainable"]
    assert len({tuple(t) for t in r0["ddp"]["trainable"]}) == 3, "each round should select a new half"
    for rnd in range(3):
        assert_bitwise_equal(r0["ddp"]["rounds"][rnd], r1["ddp"]["rounds"][rnd], f"after round {rnd}")
        # the single-process reference uses freeze="requires_grad": the same trajectory
        assert_close(r0["ddp"]["rounds"][rnd], r0["single"]["rounds"][rnd], f"after round {rnd}")


def test_ddp_halfadam_requires_grad_rewrap_after_new_round(ddp_results):
    """freeze="requires_grad": wrap a new DDP around the module after every new_round()
    (find_unused_parameters=False is enough: every trainable tensor is used)."""
    r0, r1 = ddp_results("halfadam_rewrap")
    for r in (r0, r1):
        assert r["ddp"]["error"] is None, r["ddp"]["error"]
    assert r0["ddp"]["trainable"] == r1["ddp"]["trainable"] == r0["single"]["trainable"]
    for rnd in range(3):
        assert_bitwise_equal(r0["ddp"]["rounds"][rnd], r1["ddp"]["rounds"][rnd], f"after round {rnd}")
        assert_close(r0["ddp"]["rounds"][rnd], r0["single"]["rounds"][rnd], f"after round {rnd}")


def test_ddp_halfadam_requires_grad_not_rewrapped_desyncs_then_raises(ddp_results):
    """Not re-wrapping (observed on torch 2.13): the first step after new_round() runs, but the
    reducer's bucket still waits for the tensors that new_round() froze, so it is never
    all-reduced and each rank steps on its local gradient; the ranks diverge. The next forward
    then raises "Expected to have finished reduction in the prior iteration ..."."""
    r0, r1 = ddp_results("halfadam_not_rewrapped")
    for r in (r0, r1):
        error = r["ddp"]["error"]
        assert error is not None and error.startswith("RuntimeError"), error
        assert "finished reduction" in error, error
        assert len(r["ddp"]["rounds"]) == 1  # round 0 completed, round 1 did not
        assert r["ddp"]["steps_done"] > STEPS  # at least one step after new_round() went through
    assert_bitwise_equal(r0["ddp"]["rounds"][0], r1["ddp"]["rounds"][0], "after round 0")
    assert_close(r0["ddp"]["rounds"][0], r0["single"]["rounds"][0], "after round 0")
    assert_ranks_differ(r0["ddp"]["final"], r1["ddp"]["final"], "after the unsynchronised step")


def test_ddp_halfadam_requires_grad_not_rewrapped_find_unused_diverges_silently(ddp_results):
    """With find_unused_parameters=True nothing raises, but the tensors that were frozen when
    DDP was built are not in its reducer: their gradients are never all-reduced and the ranks
    silently drift apart from round 1 on."""
    r0, r1 = ddp_results("halfadam_not_rewrapped_find_unused")
    for r in (r0, r1):
        assert r["ddp"]["error"] is None, r["ddp"]["error"]
        assert r["ddp"]["steps_done"] == 3 * STEPS
    assert_bitwise_equal(r0["ddp"]["rounds"][0], r1["ddp"]["rounds"][0], "after round 0")
    assert_ranks_differ(r0["ddp"]["rounds"][1], r1["ddp"]["rounds"][1], "after round 1")
    # exactly the tensors trainable now but frozen when DDP was built drift apart
    frozen_at_wrap = set(r0["ddp"]["final"]) - set(r0["ddp"]["trainable"][0])
    drifted = {
        n for n in r0["ddp"]["final"] if not torch.equal(r0["ddp"]["rounds"][1][n], r1["ddp"]["rounds"][1][n])
    }
    assert drifted == frozen_at_wrap & set(r0["ddp"]["trainable"][1])


def test_ddp_built_before_halfadam_breaks_round_0(ddp_results):
    """DDP(model) first, then HalfAdam(freeze="requires_grad"): the same failure already in
    round 0, so build HalfAdam before wrapping (or use freeze="mask")."""
    r0, r1 = ddp_results("halfadam_created_after_ddp")
    for r in (r0, r1):
        error = r["ddp"]["error"]
        assert error is not None and "finished reduction" in error, error
        assert r["ddp"]["rounds"] == [] and r["ddp"]["steps_done"] >= 1
    assert_ranks_differ(r0["ddp"]["final"], r1["ddp"]["final"], "after the unsynchronised step")
