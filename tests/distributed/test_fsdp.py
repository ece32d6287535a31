"""Sharded parameters (FSDP2 / DTensor) on CPU with gloo: the selection is exact over the
whole tensor, so a sharded run equals a single-process run on the same data.

Each test spawns 3 processes (uneven shards: 7 rows over 3 ranks is 3 + 3 + 1; the fused test 2) that run
the sharded optimizer and, on the side, the same optimizer on plain full tensors; every
rank compares its result with that single-process reference.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
from _helpers import exit_without_interpreter_shutdown, free_port, spawn_ranks, write_traceback
from _tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo needed"
)

WORLD = 3
TIMEOUT_S = 240


def _worker(rank, world, port, scenario, errors_dir):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        warnings.filterwarnings("ignore")
        for name in scenario.split(","):  # several scenarios share one spawn (startup is the cost)
            globals()[name](rank, world)
    except BaseException:
        write_traceback(errors_dir, rank)
        raise
    finally:
        dist.destroy_process_group()
    exit_without_interpreter_shutdown()


def _spawn(scenario: str, world: int = WORLD):
    errors = tempfile.mkdtemp(prefix="maskopt-dist-")
    spawn_ranks(_worker, (world, free_port(), scenario, errors), world, errors, TIMEOUT_S, scenario)


# ------------------------------------------------------------------------------ scenarios

SHAPES = [(7, 5), (6, 4), (3,), (1, 9), (64, 3), (2,)]  # uneven, tiny, fewer rows than ranks


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _full_params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    out = [torch.randn(s, generator=gen) for s in SHAPES]
    out[1] = torch.ones(SHAPES[1]) * (1 if step % 2 else -1)  # every |g| ties: lowest index must win
    out[4][::3] = 0.5  # many ties at one value, spread over the shards
    return out


def _equal_nan(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _compare_direct(rank, world, make, steps=4, block_size=None, grads=None, equal=torch.equal):
    """Sharded DTensor params with the same gradients as a plain run: bitwise equal."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _mesh(world)
    full = _full_params()
    plain = [torch.nn.Parameter(t.clone()) for t in full]
    sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
    opt_plain, opt_sharded = make(plain), make(sharded)
    for step in range(steps):
        for p, q, g in zip(plain, sharded, (grads or _grads)(step), strict=True):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        opt_plain.step()
        opt_sharded.step()
        for i, (p, q) in enumerate(zip(plain, sharded, strict=True)):
            got = q.detach().full_tensor()
            assert equal(got, p.detach()), (
                f"step {step}, tensor {i} {tuple(p.shape)}: {(got != p).sum().item()} entries differ"
            )
            m = opt_sharded.state[q]["exp_avg"].full_tensor()
            assert equal(m, opt_plain.state[p]["exp_avg"])


def mofo_momentum(rank, world):
    from maskopt import MoFO

    _compare_direct(rank, world, lambda ps: MoFO(ps, lr=1e-2, alpha=0.3, weight_decay=0.1))


def _interpreted_kernels(**knobs):
    """The fused path on CPU: the Triton interpreter, set before the kernels are built, with
    chunks and capacities small enough for these shapes to take every mode."""
    os.environ["TRITON_INTERPRET"] = "1"
    from maskopt.kernels import launch

    return launch.config(
        **{**dict(chunk=16, local_max=8, local_tile=64, cand_min=1, cand_frac=0.05), **knobs}
    )


def fused_mofo(rank, world):
    """The Triton path on shards (interpreted): the same bits as one process on whole tensors."""
    from maskopt import MoFO, RandomBCD

    with _interpreted_kernels():
        for i, make in enumerate(
            (
                lambda ps: MoFO(ps, lr=1e-2, alpha=0.3, weight_decay=0.1, fused=True),
                lambda ps: MoFO(
                    ps,
                    lr=1e-2,
                    alpha=0.1,
                    filter="gradient",
                    mask_weight_decay=False,
                    weight_decay=0.1,
                    fused=True,
                ),
                lambda ps: RandomBCD(ps, lr=1e-2, alpha=0.3, seed=5, exact=True, fused=True),
                lambda ps: RandomBCD(ps, lr=1e-2, alpha=0.3, seed=5, fused=True),
            )
        ):
            _compare_direct(rank, world, make, steps=3 if i == 0 else 2)  # the first takes every mode
        from maskopt.kernels import launch

        sharded_plans = [key for key in launch.PLANS if key[-1] is not None]  # (cleared on leaving)
        assert sharded_plans and all(key[-1][0] == world for key in sharded_plans)


def fused_mofo_zeros_and_spikes(rank, world):
    """Momenta mostly zero (ranked by global index across the ranks) and a spike that sends the
    threshold out of the window (the level-by-level fallback)."""
    from maskopt import MoFO

    def grads(step):
        out = _grads(step)
        out[4] = torch.zeros(SHAPES[4])
        out[4][5::7] = 1e-3
        out[0] = out[0] * (1e4 if step == 2 else 1.0)
        return out

    os.environ["TRITON_INTERPRET"] = "1"
    from maskopt.kernels import launch

    launch._debug_capture = seen = []
    with _interpreted_kernels(cand_frac=3.0):  # every bin fits: window ties resolved across ranks
        _compare_direct(
            rank, world, lambda ps: MoFO(ps, lr=1e-2, alpha=0.3, fused=True), steps=4, grads=grads
        )
    launch._debug_capture = None
    modes = {int(m) for rec in seen for m in rec["sst"][0]}
    assert {0, 2, 3} <= modes, modes  # window, zeros, fallback
    with _interpreted_kernels():
        _compare_direct(
            rank,
            world,
            lambda ps: MoFO(ps, lr=1e-2, alpha=0.3, fused=True, moment_dtype=torch.bfloat16),
            steps=2,
        )


def mofo_float64(rank, world):
    from maskopt import MoFO

    def grads(step):
        out = _grads(step)
        # distinct in float64, equal in float32: larger at higher indices, so a float32 key
        # (ties to the lowest index) would pick the wrong entries
        out[0] = 1.0 + torch.arange(out[0].numel()).reshape(out[0].shape) * 1e-12
        return out

    torch.set_default_dtype(torch.float64)
    try:
        _compare_direct(rank, world, lambda ps: MoFO(ps, lr=1e-2, alpha=0.3), steps=2, grads=grads)
    finally:
        torch.set_default_dtype(torch.float32)


def mofo_nan(rank, world):
    """NaN ranks as the largest |m| on the sharded path too: the same entries move as in
    one process, exactly k of them."""
    from maskopt import MoFO, topk_count

    def grads(step):
        out = _grads(step)
        for g in out:
            g.view(-1)[1::4] = float("nan")
        return out

    before = [t.clone() for t in _full_params()]
    _compare_direct(
        rank, world, lambda ps: MoFO(ps, lr=1e-2, alpha=0.5), steps=1, grads=grads, equal=_equal_nan
    )
    plain = [torch.nn.Parameter(t.clone()) for t in before]
    opt = MoFO(plain, lr=1e-2, alpha=0.5)
    for p, g in zip(plain, grads(0), strict=True):
        p.grad = g
    opt.step()
    for p, p0 in zip(plain, before, strict=True):
        moved = (p.detach() != p0) | p.detach().isnan()
        assert int(moved.sum()) == topk_count(p.numel(), 0.5)


def mofo_gradient_small_alpha(rank, world):
    from maskopt import MoFO

    _compare_direct(rank, world, lambda ps: MoFO(ps, lr=1e-2, alpha=0.05, filter="gradient"))


def random_bcd_both(rank, world):
    from maskopt import RandomBCD

    _compare_direct(rank, world, lambda ps: RandomBCD(ps, lr=1e-2, alpha=0.3, seed=3))
    _compare_direct(rank, world, lambda ps: RandomBCD(ps, lr=1e-2, alpha=0.3, seed=3, exact=True))


def block_size_alignment(rank, world):
    from torch.distributed.tensor import Shard, distribute_tensor

    from maskopt import MoFO

    mesh = _mesh(world)
    # 6 rows of 4 over 3 ranks: 8 entries per shard, so blocks of 4 and 8 stay inside a shard
    for block in (4, 8):
        gen = torch.Generator().manual_seed(block)
        full = torch.randn(6, 4, generator=gen)
        p = torch.nn.Parameter(full.clone())
        q = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
        a, b = (
            MoFO([p], lr=1e-2, alpha=0.25, block_size=block),
            MoFO([q], lr=1e-2, alpha=0.25, block_size=block),
        )
        g = torch.randn(6, 4, generator=gen)
        p.grad, q.grad = g.clone(), distribute_tensor(g.clone(), mesh, [Shard(0)])
        a.step()
        b.step()
        assert torch.equal(q.detach().full_tensor(), p.detach())
    # blocks of 16 would straddle shards: refused before anything changes
    q = torch.nn.Parameter(distribute_tensor(torch.ones(6, 4), mesh, [Shard(0)]))
    q.grad = distribute_tensor(torch.ones(6, 4), mesh, [Shard(0)])
    opt = MoFO([q], lr=1e-2, alpha=0.25, block_size=16)
    with pytest.raises(ValueError, match="block_size=16"):
        opt.step()
    assert torch.equal(q.detach().full_tensor(), torch.ones(6, 4))


def _llama():
    return tiny_llama(
        2,
        kv_heads=2,
        vocab=48,
        hidden=16,
        intermediate=24,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )


def _batch(step, world):
    gen = torch.Generator().manual_seed(step)
    return torch.randint(0, 48, (2 * world, 10), generator=gen)


def _fsdp_vs_single(rank, world, make, steps=3, round_at=None, telemetry=False):
    """FSDP2 (fully_shard per layer and at the root), each rank on its slice of the batch,
    against one process on the whole batch."""
    from torch.distributed.fsdp import fully_shard

    from maskopt import UpdateTelemetry

    mesh = _mesh(world)
    single, sharded = _llama(), _llama()
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    opt_single, opt_sharded = make(single), make(sharded)
    if telemetry:
        tel_single = UpdateTelemetry(opt_single, single.named_parameters(), track_distance=True)
        tel_sharded = UpdateTelemetry(opt_sharded, sharded.named_parameters(), track_distance=True)
    start = {n: p.detach().clone() for n, p in single.named_parameters()}
    for step in range(steps):
        if round_at is not None and step == round_at:
            opt_single.new_round()
            opt_sharded.new_round()
        ids = _batch(step, world)
        single(input_ids=ids, labels=ids).loss.backward()
        mine = ids[rank * 2 : (rank + 1) * 2]
        sharded(input_ids=mine, labels=mine).loss.backward()
        opt_single.step()
        opt_sharded.step()
        opt_single.zero_grad()
        opt_sharded.zero_grad()
        if step == 0:  # the entries that moved: the same set in both runs
            for (name, p), (_, q) in zip(single.named_parameters(), sharded.named_parameters(), strict=True):
                moved_single = p.detach() != start[name]
                moved_sharded = q.detach().full_tensor() != start[name]
                assert torch.equal(moved_single, moved_sharded), f"{name}: different entries moved"
    # The gradients differ in their last bits (FSDP averages per-rank losses, one process the
    # whole batch), and Adam's m / sqrt(v) amplifies that over the steps: measured up to 1.3e-6
    # on weights of 0.09 after three steps.
    for (name, p), (_, q) in zip(single.named_parameters(), sharded.named_parameters(), strict=True):
        torch.testing.assert_close(q.detach().full_tensor(), p.detach(), rtol=1e-5, atol=3e-6, msg=name)
    if telemetry:  # whole-tensor counts and distances, on every rank
        want, got = tel_single.as_dict(per_tensor=True), tel_sharded.as_dict(per_tensor=True)
        assert want.keys() == got.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def fsdp_mofo(rank, world):
    from maskopt import MoFO

    _fsdp_vs_single(rank, world, lambda m: MoFO(m.parameters(), lr=1e-2, alpha=0.1), telemetry=True)


def fsdp_random_bcd(rank, world):
    from maskopt import RandomBCD

    _fsdp_vs_single(
        rank, world, lambda m: RandomBCD(m.parameters(), lr=1e-2, alpha=0.2, seed=5), telemetry=True
    )


def fsdp_half_adam_rounds(rank, world):
    from maskopt import HalfAdam

    for freeze in ("mask", "requires_grad"):
        _fsdp_vs_single(
            rank,
            world,
            lambda m, freeze=freeze: HalfAdam(m.named_parameters(), lr=1e-2, freeze=freeze, seed=1),
            steps=4,
            round_at=2,
        )
    # "parameter" strategy: a hashed half of the entries of every tensor, on global indices
    _fsdp_vs_single(rank, world, lambda m: HalfAdam(m.named_parameters(), lr=1e-2, strategy="parameter"))


def fsdp_dcp_resume(rank, world):
    """torch.distributed.checkpoint of a sharded MoFO run: save at step 2, load into a fresh
    model and optimizer, and two more steps equal the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from maskopt import MoFO

    mesh = _mesh(world)

    def build():
        model = _llama()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, MoFO(model.parameters(), lr=1e-2, alpha=0.1)

    def train(model, opt, steps):
        for step in steps:
            ids = _batch(step, world)[rank * 2 : (rank + 1) * 2]
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

    path = os.path.join(tempfile.gettempdir(), f"maskopt-dcp-{os.environ['MASTER_PORT']}")
    model, opt = build()
    train(model, opt, range(2))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    train(model, opt, range(2, 4))

    fresh, fresh_opt = build()
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)  # creates the state (an lr=0 step)
    assert all(
        torch.equal(p.full_tensor(), q.full_tensor())
        for p, q in zip(fresh.parameters(), build()[0].parameters(), strict=True)
    ), "the state-creating step moved a parameter"
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(fresh, fresh_opt, range(2, 4))
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p.full_tensor(), q.full_tensor()), name


def tensor_parallel_refused(rank, world):
    from torch.distributed.tensor import Shard, distribute_tensor

    from maskopt import MoFO

    mesh = _mesh(world)
    q = torch.nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))
    q.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
    with pytest.raises(NotImplementedError, match="Shard"):
        MoFO([q], lr=1e-2, alpha=0.5).step()
    assert torch.equal(q.detach().full_tensor(), torch.ones(4, 6))


# ------------------------------------------------------------------------------ tests


def test_fused_sharded_step_equals_single_process_bitwise():
    """FSDP2 shards on the Triton path (the interpreter here; NCCL and CUDA on a GPU): exact
    over the whole tensor, bitwise equal to the fused step of one process. Two ranks (4 + 3
    rows, and a rank holding none of the 1-row tensor): every rank runs the interpreter, and a
    third one on two cores cost a third more time for no path the other tests leave out."""
    _spawn("fused_mofo,fused_mofo_zeros_and_spikes", world=2)


def test_sharded_dtensor_step_equals_single_process_bitwise():
    _spawn(
        "mofo_momentum,mofo_float64,mofo_nan,mofo_gradient_small_alpha,random_bcd_both,block_size_alignment,"
        "tensor_parallel_refused"
    )


def test_fsdp2_training_equals_single_process():
    pytest.importorskip("transformers")
    _spawn("fsdp_mofo,fsdp_random_bcd,fsdp_half_adam_rounds")


def test_fsdp2_distributed_checkpoint_resume():
    pytest.importorskip("transformers")
    _spawn("fsdp_dcp_resume")


if (
    __name__ == "__main__"
):  # one scenario by hand: PYTHONPATH=tests python tests/distributed/test_fsdp.py fsdp_mofo
    _spawn(sys.argv[1])
