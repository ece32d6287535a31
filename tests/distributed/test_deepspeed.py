"""DeepSpeed ZeRO stages 1-3 on CPU with gloo: the selection stays the exact per-tensor one.

DeepSpeed steps the client optimizer on flat fp32 partitions of many tensors; maskopt.zero maps
them back to the tensors. Every scenario trains a model whose loss is ``sum_i <p_i, t_i>``,
so the gradient of ``p_i`` is the chosen ``t_i`` (ties built in), and runs, next to the
engine, the same optimizer in one process on whole tensors, fed the gradients DeepSpeed
reduced (``safe_get_full_grad``). The fp32 master weights and the moments must be equal bit
for bit after every step.

One spawn of two processes runs the scenarios of the three stages and saves universal
checkpoints (starting DeepSpeed is the cost); one of three processes resumes them and covers
ranks that hold none of a tensor.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
from _helpers import exit_without_interpreter_shutdown, free_port, spawn_ranks, write_traceback

pytest.importorskip("deepspeed")

TIMEOUT_S = 300

# uneven sizes, a tensor smaller than the ranks, tensors that straddle the partition borders
SHAPES = [(7, 5), (6, 4), (3,), (1, 9), (64, 3), (2,)]


def _start_deepspeed(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    import deepspeed

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel at start-up (about
    # 90 s on two cores); only inference_all_reduce uses it, so gloo alone serves these tests.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")


def _worker(rank, world, port, scenarios, shared_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        _start_deepspeed(rank, world, port)
        for name in scenarios:
            globals()[name](rank, world, shared_dir)
    except BaseException:
        write_traceback(shared_dir, rank)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    exit_without_interpreter_shutdown()


def _spawn(scenarios: list[str], world: int, shared: str | None = None) -> None:
    shared = shared or tempfile.mkdtemp(prefix="maskopt-deepspeed-")
    spawn_ranks(_worker, (world, free_port(), scenarios, shared), world, shared, TIMEOUT_S, str(scenarios))


# ------------------------------------------------------------------------------ the model


class Targets(torch.nn.Module):
    """Loss ``sum_i <p_i, t_i>``: the gradient of ``p_i`` is ``t_i``. The tensors sit on the
    module itself, so ZeRO-3 gathers them for its forward."""

    def __init__(self, shapes, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for i, shape in enumerate(shapes):
            setattr(self, f"w{i}", torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)))

    def forward(self, *targets):
        return sum((p * t).sum() for p, t in zip(self.parameters(), targets, strict=True))


def _targets(step, shapes=SHAPES, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    out = [torch.randn(s, generator=gen) for s in shapes]
    if len(shapes) == len(SHAPES):
        out[1] = torch.full(shapes[1], 1.0 if step % 2 else -1.0)  # every |g| ties
        # 64 ties at the largest |g| and k = 58 of them to take: the lowest global indices,
        # spread over the ranks' fragments
        out[4] = out[4] * 0.1
        out[4][::3] = 0.5
    return [t.to(dtype) for t in out]


def _config(stage, bf16=False, load_universal=False, offload=False):
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    if offload:  # ZeRO-Offload, stepping the client optimizer rather than DeepSpeedCPUAdam
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def _engine(stage, make, shapes=SHAPES, bf16=False, **config):
    """A DeepSpeed engine with the optimizer ``make`` builds, and the tensors it trains (those
    that require grad when it is built: DeepSpeed partitions only these)."""
    import deepspeed

    model = Targets(shapes, torch.bfloat16 if bf16 else torch.float32)
    opt = make(model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=_config(stage, bf16, **config))
    assert engine.optimizer.optimizer is opt
    return engine, opt, trained


def _full(params, key=None):
    """The fp32 master weights (or optimizer state ``key``) of tensors in the ZeRO partitions,
    gathered (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if key is None:
        return [safe_get_full_fp32_param(p).clone() for p in params]
    return [safe_get_full_optimizer_state(p, key).clone() for p in params]


def _train_step(engine, step, shapes=SHAPES, bf16=False):
    """One engine step; returns the reduced gradients (None for a frozen tensor)."""
    from deepspeed.utils import safe_get_full_grad

    loss = engine(*_targets(step, shapes, torch.bfloat16 if bf16 else torch.float32))
    engine.backward(loss)
    grads = [
        safe_get_full_grad(p).float().clone() if p.requires_grad else None for p in engine.module.parameters()
    ]
    engine.step()
    return grads


def _assert_equal(got, want, what):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        a = a.reshape(b.shape)
        assert torch.equal(a, b), (
            f"{what}, tensor {i} {tuple(b.shape)}: {(a != b).sum().item()} entries differ"
        )


def _compare_with_one_process(stage, make, steps=3, shapes=SHAPES, bf16=False, new_round_at=None, **config):
    """A ZeRO run and a one-process run of the same optimizer on the same gradients: equal."""
    engine, opt, trained = _engine(stage, make, shapes, bf16, **config)
    if config.get("offload"):
        offloaded = engine.optimizer.cpu_offload if stage < 3 else engine.optimizer.offload_optimizer
        assert engine.zero_cpu_offload() and offloaded
    params = list(engine.module.parameters())
    # the frozen tensors' values do not matter: no gradient depends on them
    start = iter(_full(trained))
    plain = [
        torch.nn.Parameter(next(start) if p.requires_grad else torch.zeros(s))
        for p, s in zip(params, shapes, strict=True)
    ]
    reference = make(plain)
    in_zero = [i for i, p in enumerate(params) if any(p is t for t in trained)]
    for step in range(steps):
        if step == new_round_at:
            opt.new_round()
            reference.new_round()
        grads = _train_step(engine, step, shapes, bf16)
        for q, g in zip(plain, grads, strict=True):
            q.grad = g
        reference.step()
        _assert_equal(
            _full(trained), [plain[i].detach() for i in in_zero], f"stage {stage}, step {step}: weights"
        )
        stepped = [i for i in in_zero if plain[i] in reference.state]
        for key in ("exp_avg", "exp_avg_sq"):
            got = _full([params[i] for i in stepped], key)
            _assert_equal(
                got, [reference.state[plain[i]][key] for i in stepped], f"stage {stage}, step {step}: {key}"
            )
    engine.destroy()


# ------------------------------------------------------------------------------ scenarios


def _mofo(**kw):
    from maskopt import MoFO

    return lambda ps: MoFO(ps, lr=1e-2, alpha=0.3, weight_decay=0.1, **kw)


def _random_bcd(**kw):
    from maskopt import RandomBCD

    return lambda ps: RandomBCD(ps, lr=1e-2, alpha=0.3, seed=5, **kw)


def _half_adam(**kw):
    from maskopt import HalfAdam

    return lambda ps: HalfAdam(ps, lr=1e-2, ratio=0.5, **kw)


def _mofo_two_groups():
    """The official MoFO grouping's shape: filtered, decayed matrices; vectors plain AdamW."""
    from maskopt import MoFO

    def make(params):
        params = list(params)
        matrices = [p for p in params if len(getattr(p, "ds_shape", p.shape)) > 1]
        vectors = [p for p in params if len(getattr(p, "ds_shape", p.shape)) <= 1]
        return MoFO(
            [{"params": matrices}, {"params": vectors, "alpha": 1.0, "weight_decay": 0.0}],
            lr=1e-2,
            alpha=0.3,
            weight_decay=0.1,
        )

    return make


OPTIMIZERS = {
    "mofo": _mofo(),
    "mofo_gradient": _mofo(filter="gradient"),
    "random_bcd": _random_bcd(),
    "random_bcd_exact": _random_bcd(exact=True),
    "half_adam_mask": _half_adam(freeze="mask"),
    "half_adam_entries": _half_adam(freeze="mask", strategy="parameter"),
    "mofo_two_groups": _mofo_two_groups(),
}


def every_optimizer_each_stage(rank, world, shared):
    for stage in (1, 2, 3):
        for name, make in OPTIMIZERS.items():
            try:
                _compare_with_one_process(stage, make, new_round_at=2 if name.startswith("half") else None)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None


def bf16_each_stage(rank, world, shared):
    for stage in (1, 2, 3):  # stage 1 with bf16 runs DeepSpeed's BF16_Optimizer
        _compare_with_one_process(stage, _mofo_two_groups(), bf16=True)
        _compare_with_one_process(stage, _random_bcd(exact=True), steps=2, bf16=True)


def half_adam_requires_grad(rank, world, shared):
    """The half frozen before deepspeed.initialize trains exactly; a new round under the same
    engine is refused at the next step, before anything changes."""
    make = _half_adam()
    for stage in (1, 2, 3):
        _compare_with_one_process(stage, make, steps=2)
    engine, opt, trained = _engine(2, make)
    _train_step(engine, 0)
    before = _full(trained)
    opt.new_round()
    with pytest.raises(RuntimeError, match="in none of DeepSpeed's ZeRO partitions"):
        _train_step(engine, 1)
    _assert_equal(_full(trained), before, "refused step")


def block_size_fits_or_is_refused(rank, world, shared):
    """block_size blocks inside one rank's fragment are exact; blocks straddling two are
    refused on every rank before anything changes."""
    shapes = [
        (8, 4),
        (4, 4),
    ]  # two ranks: fragments of 24 + 8 and 16 entries (ZeRO-1/2), 16 + 16 and 8 + 8 (ZeRO-3)
    for stage in (2, 3):
        _compare_with_one_process(stage, _mofo(block_size=8), steps=2, shapes=shapes)
    engine, _, trained = _engine(2, _mofo(block_size=5), shapes)
    before = _full(trained)
    with pytest.raises(ValueError, match="block_size=5 does not fit"):
        _train_step(engine, 0, shapes)
    _assert_equal(_full(trained), before, "refused step")


def _count_compiled_steps():
    """Counts the calls of the compiled CPU step (in this process, from now on)."""
    from maskopt import cpu_step

    calls = []
    real = cpu_step.masked_adam_cpu_

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    cpu_step.masked_adam_cpu_ = counted
    return calls, lambda: setattr(cpu_step, "masked_adam_cpu_", real)


def offload_each_stage(rank, world, shared):
    """ZeRO-Offload (stages 2 and 3, ``offload_optimizer: cpu``, the client optimizer): the
    partitions live in host memory, the compiled CPU step takes them (where it builds), and
    every step equals one process bit for bit."""
    from maskopt import cpu_step

    calls, restore = _count_compiled_steps()
    try:
        for stage in (2, 3):
            for name in ("mofo", "random_bcd", "half_adam_mask"):
                try:
                    _compare_with_one_process(
                        stage,
                        OPTIMIZERS[name],
                        new_round_at=2 if name.startswith("half") else None,
                        offload=True,
                    )
                except AssertionError as e:
                    raise AssertionError(f"offload, {name}: {e}") from None
    finally:
        restore()
    assert bool(calls) == cpu_step.available()


def checkpoint_resume(rank, world, shared):
    """engine.save_checkpoint / load_checkpoint: the resumed run equals the uninterrupted one
    (ZeRO-Offload too)."""
    cases = (
        (1, _mofo(), False),
        (2, _random_bcd(), False),
        (3, _mofo(), False),
        (3, _half_adam(freeze="mask", strategy="parameter"), False),
        (2, _mofo(), True),
        (3, _random_bcd(exact=True), True),
    )
    for case, (stage, make, offload) in enumerate(cases):
        folder = os.path.join(shared, f"checkpoint-{case}")
        engine, _, params = _engine(stage, make, offload=offload)
        for step in range(2):
            _train_step(engine, step)
        engine.save_checkpoint(folder, tag="t")
        for step in range(2, 4):
            _train_step(engine, step)
        want = [_full(params), _full(params, "exp_avg"), _full(params, "exp_avg_sq")]
        engine.destroy()

        engine, _, params = _engine(stage, make, offload=offload)  # a fresh model and optimizer
        engine.load_checkpoint(folder, tag="t")
        for step in range(2, 4):
            _train_step(engine, step)
        got = [_full(params), _full(params, "exp_avg"), _full(params, "exp_avg_sq")]
        for what, a, b in zip(("weights", "exp_avg", "exp_avg_sq"), got, want, strict=True):
            _assert_equal(a, b, f"stage {stage} resume: {what}")
        engine.destroy()


UNIVERSAL_STAGES = (1, 2, 3)


def save_universal_checkpoints(rank, world, shared):
    """Two ranks train 2 steps and save; DeepSpeed's ds_to_universal turns the checkpoints
    into per-tensor ones (for another world size)."""
    import subprocess

    for stage in UNIVERSAL_STAGES:
        folder = os.path.join(shared, f"universal-{stage}")
        engine, _, params = _engine(stage, _mofo())
        for step in range(2):
            _train_step(engine, step)
        engine.save_checkpoint(folder, tag="t")
        saved = [_full(params), _full(params, "exp_avg")]
        if rank == 0:
            torch.save(saved, os.path.join(folder, "expected.pt"))
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder",
                    os.path.join(folder, "t"),
                    "--output_folder",
                    os.path.join(folder, "t_universal"),
                    "--num_extract_workers",
                    "1",
                    "--num_merge_workers",
                    "1",
                    "--inject_missing_state",
                ],
                check=True,
                capture_output=True,
                env={**os.environ, "DS_ACCELERATOR": "cpu"},
            )
        dist.barrier()
        engine.destroy()


def resume_universal_on_three_ranks(rank, world, shared):
    """The two-rank checkpoints resumed on three ranks: the state arrives exactly, and the
    next steps equal one process fed the same gradients. A regular checkpoint is refused."""
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    engine, _, _ = _engine(2, _mofo())
    with pytest.raises(ZeRORuntimeException, match="DP world size of 2"):  # DeepSpeed's own refusal
        engine.load_checkpoint(os.path.join(shared, "universal-2"), tag="t")
    engine.destroy()
    for stage in UNIVERSAL_STAGES:
        folder = os.path.join(shared, f"universal-{stage}")
        engine, _, params = _engine(stage, _mofo(), load_universal=True)
        plain = [torch.nn.Parameter(t) for t in _full(params)]  # the initial weights, as the two ranks had
        reference = _mofo()(plain)
        for step in range(2):  # two ranks averaged identical targets: the gradients were the targets
            for q, t in zip(plain, _targets(step), strict=True):
                q.grad = t
            reference.step()
        engine.load_checkpoint(folder, tag="t_universal")
        weights, exp_avg = torch.load(os.path.join(folder, "expected.pt"))
        _assert_equal(weights, [q.detach() for q in plain], f"stage {stage}: the reference after 2 steps")
        _assert_equal(_full(params), weights, f"stage {stage}: loaded weights")
        _assert_equal(_full(params, "exp_avg"), exp_avg, f"stage {stage}: loaded exp_avg")
        for step in range(2, 4):
            for q, g in zip(plain, _train_step(engine, step), strict=True):
                q.grad = g
            reference.step()
            _assert_equal(
                _full(params), [q.detach() for q in plain], f"stage {stage}, step {step} on 3 ranks: weights"
            )
        engine.destroy()


def hf_trainer_one_rank(rank, world, shared):
    """The Trainer with a DeepSpeed config builds the optimizer from optimizer_cls_and_kwargs
    (HalfAdam gets names through a "params" kwarg); an optimizer instance passed through
    optimizers= is silently replaced by the Trainer's AdamW."""
    from _helpers import reset_accelerate_state
    from _tiny_models import TokenData, tiny_llama
    from transformers import Trainer, TrainingArguments

    from maskopt import HalfAdam, MoFO

    cfg = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    }
    args = TrainingArguments(
        os.path.join(shared, "hf"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        deepspeed=cfg,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )

    def trained(**how):
        reset_accelerate_state()  # one Accelerator per Trainer, as in its own process
        model = tiny_llama(layers=2)
        how = {k: v(model) for k, v in how.items()}
        trainer = Trainer(model=model, args=args, train_dataset=TokenData(n=8, vocab=96), **how)
        trainer.train()
        return trainer.model_wrapped.optimizer.optimizer, model

    opt, _ = trained(optimizer_cls_and_kwargs=lambda m: (MoFO, {"lr": 1e-3, "alpha": 0.1}))
    assert isinstance(opt, MoFO) and opt.state and all(int(s["step"]) == 2 for s in opt.state.values())
    named = {"lr": 1e-3}
    opt, model = trained(
        optimizer_cls_and_kwargs=lambda m: (HalfAdam, {**named, "params": list(m.named_parameters())})
    )
    assert isinstance(opt, HalfAdam) and opt.plan is not None
    assert 0 < sum(p.requires_grad for p in model.parameters()) < len(list(model.parameters()))
    opt, _ = trained(optimizers=lambda m: (MoFO(m.parameters(), lr=1e-3), None))
    assert type(opt) is torch.optim.AdamW, type(opt)


class _CountingDist:
    """torch.distributed with its collectives counted (maskopt.distributed calls them)."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if name.startswith(("all_", "broadcast", "reduce", "gather", "scatter")):

            def counted(*args, **kwargs):
                self.calls += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def rank_without_a_tensor(rank, world, shared):
    """Three ranks: some hold none of a small tensor (ZeRO-1/2) or only its padding (ZeRO-3);
    they take part with empty fragments, making as many collective calls as the others."""
    import maskopt.distributed
    from maskopt import zero

    for stage in (1, 3):
        for make in (_mofo(), _random_bcd(exact=True)):
            _compare_with_one_process(stage, make, steps=2)
        engine, opt, _ = _engine(stage, _mofo())
        group = opt.param_groups[0]
        counter = _CountingDist(maskopt.distributed.dist)
        maskopt.distributed.dist = counter
        held = []
        real_fragments = zero.fragments

        def spy(flat, built, real_fragments=real_fragments, held=held):
            found = real_fragments(flat, built)
            held.extend(f.numel for f in found)
            return found

        zero.fragments = spy
        try:
            _train_step(engine, 0)
        finally:
            maskopt.distributed.dist, zero.fragments = counter.real, real_fragments
        assert group is opt.param_groups[0]
        empty = torch.tensor([sum(1 for n in held if n == 0)])
        calls = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(calls, torch.tensor([counter.calls]))
        dist.all_reduce(empty)
        assert int(empty) > 0, (
            f"stage {stage}: every rank holds part of every tensor; the scenario tests nothing"
        )
        per_rank = [int(c) for c in calls]
        assert len(set(per_rank)) == 1 and per_rank[0] > 0, (
            f"stage {stage}: collective calls per rank {per_rank}"
        )
        engine.destroy()


# ------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def two_ranks():
    """One spawn of two ranks (starting DeepSpeed is the cost) runs every two-rank scenario and
    leaves the universal checkpoints that the three-rank spawn resumes from; returns their folder."""
    shared = tempfile.mkdtemp(prefix="maskopt-deepspeed-")
    _spawn(
        [
            "every_optimizer_each_stage",
            "bf16_each_stage",
            "half_adam_requires_grad",
            "block_size_fits_or_is_refused",
            "offload_each_stage",
            "checkpoint_resume",
            "save_universal_checkpoints",
        ],
        world=2,
        shared=shared,
    )
    return shared


def test_zero_stages_equal_one_process_two_ranks(two_ranks):
    """Stages 1, 2, 3; MoFO (both filters), RandomBCD (both modes), HalfAdam (both freeze
    modes, a new round); fp32 and bf16; block_size; ZeRO-Offload (stages 2 and 3, through the
    compiled CPU step); checkpoint resume: every rank checked its
    scenarios in the ``two_ranks`` spawn, which fails this test if any of them failed."""
    assert os.path.isdir(two_ranks)


def test_zero_universal_checkpoint_on_three_ranks_and_ranks_holding_none_of_a_tensor(two_ranks):
    """The two ranks' universal checkpoints resume on three; then three ranks where one holds
    none of a tensor (one spawn for both)."""
    _spawn(["resume_universal_on_three_ranks", "rank_without_a_tensor"], world=3, shared=two_ranks)


def test_hf_trainer_with_a_deepspeed_config():
    pytest.importorskip("transformers")
    _spawn(["hf_trainer_one_rank"], world=1)


def test_benchmark_script_runs():
    """benchmarks/deepspeed_step.py end to end, tiny (its numbers are not checked, its table is)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    tiny = [
        "--stages",
        "2",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--vocab",
        "64",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
    ]
    out = subprocess.run(
        [sys.executable, "benchmarks/deepspeed_step.py", *tiny],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("2 ")]
    assert [r[1] for r in rows][:2] == ["AdamW", "MoFO(alpha=0.1)"] and rows[0][3] == "1.00"
