"""MoFO, RandomBCD and HalfAdam with mixed precision, torch.compile and checkpoints (PyTorch path, CPU).

1. GradScaler + autocast: a step with inf gradients changes nothing (bit for bit), the scale
   backs off, training continues as if the step never happened; bf16 parameters keep fp32
   moments and track an fp32-master reference within bf16 rounding.
2. torch.compile of a whole training step equals eager; where the optimizer step breaks the
   graph (documented in the notes for README).
3. State dicts switch between AdamW, MoFO and RandomBCD mid-run with the moments carrying on;
   HalfAdam's state dict across new_round(); every state dict loads with weights_only=True.
4. torch.distributed.checkpoint (DCP) in one process, with and without a gloo process group.
5. lr=0 with zero gradients (what DCP's optimizer-state initialisation does) moves nothing.
"""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn

try:
    from torch.distributed.checkpoint.api import CheckpointException
except ImportError:  # a torch build without torch.distributed: the DCP tests skip
    CheckpointException = RuntimeError

from _helpers import free_port

from maskopt import HalfAdam, MoFO, RandomBCD, mofo_param_groups
from maskopt.reference import reference_step

X = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))


def mlp(seed=0, widths=(8, 16, 4)):
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


# Each factory takes the model. HalfAdam(strategy="parameter") on an MLP (no layer stack)
# trains a fixed random half of every tensor's entries: a masked update, keyed by the round.
FACTORIES = {
    "mofo": lambda m: MoFO(m.parameters(), lr=1e-2, alpha=0.25, weight_decay=0.01),
    "random_bcd": lambda m: RandomBCD(m.parameters(), lr=1e-2, alpha=0.3, seed=1),
    "half_adam": lambda m: HalfAdam(m.named_parameters(), lr=1e-2, strategy="parameter", seed=2),
}


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        i: {k: v.clone() for k, v in opt.state[p].items()}
        for i, p in enumerate(model.parameters())
        if p in opt.state
    }
    return params, state


def assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True)), "a parameter changed"
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), f"state {key} of tensor {i} changed"


def steps_of(opt):
    return [int(s["step"]) for s in opt.state.values() if s]


# ============================================================================ 1. mixed precision


def amp_run(name, dtype, n_steps, poison_at=None, amp_scaling_protocol=False):
    """n_steps successful steps of an autocast + GradScaler loop; the step at poison_at gets an
    inf gradient first (and is then retried with the same batch, as a real loop would)."""
    model = mlp()
    opt = FACTORIES[name](model)
    assert opt._step_supports_amp_scaling is False  # CPU: the PyTorch path; GradScaler unscales
    if amp_scaling_protocol:
        opt._step_supports_amp_scaling = True  # GradScaler hands grad_scale/found_inf to step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    done, attempt, skipped = 0, 0, 0
    while done < n_steps:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            out = model(X + done)
            assert out.dtype == dtype
            loss = nn.functional.mse_loss(out.float(), Y)
        scaler.scale(loss).backward()
        poisoned = attempt == poison_at
        if poisoned:
            model[0].weight.grad[1, 2] = float("inf")
        before, scale = snapshot(model, opt), scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if poisoned:
            assert_same(snapshot(model, opt), before)
            assert scaler.get_scale() == scale * 0.5
            skipped += 1
        else:
            after = snapshot(model, opt)
            assert any(not torch.equal(a, b) for a, b in zip(after[0], before[0], strict=True))
            assert steps_of(opt) == [done + 1] * len(steps_of(opt)) and steps_of(opt)
            done += 1
        attempt += 1
    assert skipped == (poison_at is not None)
    return snapshot(model, opt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradscaler_skips_an_inf_step_and_the_run_continues_as_if_it_never_happened(name, dtype):
    clean = amp_run(name, dtype, 4)
    poisoned = amp_run(name, dtype, 4, poison_at=2)
    # The scale is a power of two, so unscaling is exact and the skip leaves no trace at all.
    assert_same(poisoned, clean)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_pytorch_path_honours_gradscalers_grad_scale_and_found_inf(name):
    # GradScaler's protocol for steps that unscale themselves (the fused path): forced on
    # the PyTorch path it must give the same bits as GradScaler unscaling the gradients.
    reference = amp_run(name, torch.bfloat16, 4, poison_at=1)
    protocol = amp_run(name, torch.bfloat16, 4, poison_at=1, amp_scaling_protocol=True)
    assert_same(protocol, reference)


def test_gradscaler_refuses_fp16_parameters_on_the_pytorch_path():
    # torch's rule for optimizers that let GradScaler unscale: fp16 *parameters* need fp32
    # master weights (autocast with fp32 params), or bf16 without a scaler.
    p = nn.Parameter(torch.randn(4, dtype=torch.float16))
    opt, scaler = MoFO([p]), torch.amp.GradScaler("cpu")
    scaler.scale((p.float() ** 2).sum()).backward()
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.step(opt)


BF16_CASES = {
    "mofo": (lambda ps: MoFO(ps, lr=0.05, alpha=0.3, weight_decay=0.1), "topk_momentum", 0.3, 0),
    "random_bcd": (lambda ps: RandomBCD(ps, lr=0.05, alpha=0.3, seed=4), "random", 0.3, 4),
    "half_adam": (lambda ps: HalfAdam(ps, lr=0.05, seed=1), "all", 1.0, 0),  # whole tensors
}


@pytest.mark.filterwarnings("ignore:HalfAdam got parameters without names")
@pytest.mark.parametrize("name", list(BF16_CASES))
def test_bf16_params_keep_fp32_moments_and_track_an_fp32_master_reference(name):
    make, kind, alpha, seed = BF16_CASES[name]
    wd = 0.1 if name == "mofo" else 0.0
    gen = torch.Generator().manual_seed(3)
    shapes = [(37, 21), (300,), (5, 1, 9)]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16)) for s in shapes]
    start = [p.detach().clone() for p in params]
    masters = [p.detach().float() for p in params]  # fp32 master weights
    ref_states = [{} for _ in params]
    opt = make(params)
    trained = [opt.is_trainable(p) if isinstance(opt, HalfAdam) else True for p in params]
    n_steps = 6
    for _ in range(n_steps):
        grads = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, (master, g) in enumerate(zip(masters, grads, strict=True)):
            if trained[i]:
                reference_step(
                    master,
                    g,
                    ref_states[i],
                    lr=0.05,
                    beta1=0.9,
                    beta2=0.999,
                    eps=1e-8,
                    weight_decay=wd,
                    selection=kind,
                    alpha=alpha,
                    seed=seed,
                    tensor_index=i,
                )
    if name == "half_adam":
        assert any(trained) and not all(trained)
    else:
        assert all(trained)
    for i, (p, master) in enumerate(zip(params, masters, strict=True)):
        assert p.dtype == torch.bfloat16
        if not trained[i]:
            assert torch.equal(p.detach(), start[i]) and len(opt.state.get(p, {})) == 0
            continue
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(state["exp_avg"].double(), ref_states[i]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            state["exp_avg_sq"].double(), ref_states[i]["exp_avg_sq"], rtol=1e-5, atol=1e-9
        )
        # Each step rounds the bf16 parameter once (at most half an ulp, 2**-8 relative);
        # nothing else separates it from the fp32 master.
        drift = (p.detach().double() - master.double()).abs()
        bound = n_steps * 2.0**-8 * (master.double().abs() + n_steps * 0.05)
        assert bool((drift <= bound).all()), (
            f"tensor {i}: bf16 drifted {float((drift - bound).max()):.3g} too far"
        )
        moved = (master.double() - start[i].double()).abs().max()
        assert moved > 0.1 > float(drift.max())  # not vacuous: the reference moved much further


# ============================================================================ 2. torch.compile


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_train_step(model, opt):
    def train_step(x, y):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return train_step


def compiled_vs_eager(make, backend, n_steps=3, compile_step_only=False):
    runs = []
    for compiled in (False, True):
        model = mlp(widths=(8, 16, 16, 4))
        opt = make(model)
        train_step = make_train_step(model, opt)
        if compile_step_only:
            step = torch.compile(opt.step, backend=backend) if compiled else opt.step
            for i in range(n_steps):
                nn.functional.mse_loss(model(X + i), Y).backward()
                step()
                opt.zero_grad()
        else:
            fn = torch.compile(train_step, backend=backend) if compiled else train_step
            for i in range(n_steps):
                fn(X + i, Y)
        runs.append(snapshot(model, opt))
    (eager_p, eager_s), (comp_p, comp_s) = runs
    assert eager_s.keys() == comp_s.keys() and eager_s
    for a, b in zip(eager_p, comp_p, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for i in eager_s:
        assert torch.equal(eager_s[i]["step"], comp_s[i]["step"])
        torch.testing.assert_close(comp_s[i]["exp_avg"], eager_s[i]["exp_avg"], rtol=1e-5, atol=1e-7)
    return runs


COMPILE_FACTORIES = {
    "mofo": FACTORIES["mofo"],
    "mofo_gradient": lambda m: MoFO(m.parameters(), lr=1e-2, alpha=0.2, filter="gradient"),
    "half_adam_whole": lambda m: HalfAdam(m.named_parameters(), lr=1e-2, strategy="model", seed=0),
}


@pytest.mark.parametrize(
    "name", ["mofo", pytest.param("mofo_gradient", marks=pytest.mark.slow), "half_adam_whole"]
)
def test_compiled_train_step_equals_eager_aot_eager(name, fresh_dynamo):
    # aot_eager: Dynamo + AOTAutograd without Inductor's C++ codegen (a few seconds).
    compiled_vs_eager(COMPILE_FACTORIES[name], "aot_eager")


# np.arange(dtype=uint32) in the hash is traced into torch.arange(dtype=torch.uint32), which
# has no CPU eager kernel; maskopt/_hash.py keeps that function out of the graph.
@pytest.mark.filterwarnings("ignore:HalfAdam got parameters without names")
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: RandomBCD(ps, alpha=0.5),
        lambda ps: HalfAdam(ps, strategy="parameter"),  # both draw their masks from the hash
    ],
    ids=["random_bcd", "half_adam_entries"],
)
def test_compiled_hash_masks_with_a_non_inductor_backend(make, fresh_dynamo):
    runs = []
    for compiled in (False, True):
        p = nn.Parameter(torch.arange(10.0))
        p.grad = torch.ones(10)
        opt = make([p])
        (torch.compile(opt.step, backend="eager") if compiled else opt.step)()
        runs.append(p.detach().clone())
    assert torch.equal(*runs)


def test_where_the_optimizer_step_breaks_the_graph(fresh_dynamo):
    model = mlp()
    opt = FACTORIES["mofo"](model)
    nn.functional.mse_loss(model(X), Y).backward()
    opt.step()  # state exists: explain() sees a steady-state step
    out = torch._dynamo.explain(opt.step)()
    assert out.graph_break_count >= 3
    where = {
        (r.reason.splitlines()[0], r.user_stack[-1].filename.replace("\\", "/").split("/")[-1])
        for r in out.break_reasons
    }
    reasons = " ".join(r for r, _ in where)
    files = {f for _, f in where}
    assert "item()" in reasons  # the per-tensor step counters are read as Python floats
    assert "numpy" in reasons  # np.partition (k-th value on CPU) has no torch._numpy twin
    assert {"pytorch_path.py", "selection.py"} <= files
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(opt.step, fullgraph=True, backend="eager")()

    # AdamW, for comparison, compiles into one graph.
    torch._dynamo.reset()
    adamw = torch.optim.AdamW(model.parameters())
    adamw.step()
    assert torch._dynamo.explain(adamw.step)().graph_break_count == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FACTORIES))
def test_compiled_train_step_and_step_equal_eager_inductor(name, fresh_dynamo):
    # The default backend: Inductor with C++ codegen (gcc), ~25 s per optimizer on 2 cores.
    compiled_vs_eager(FACTORIES[name], "inductor")
    torch._dynamo.reset()
    compiled_vs_eager(FACTORIES[name], "inductor", compile_step_only=True)


# ============================================================================ 3. state dicts


def via_disk(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_switching_adamw_mofo_random_bcd_adamw_carries_the_moments_on():
    gen = torch.Generator().manual_seed(5)
    shapes = [(23, 17), (40,), (3, 2, 7)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    adamw_twin = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.05)  # never switched
    phases = [
        ("adamw", lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)),
        ("mofo", lambda: MoFO(params, alpha=0.2, filter="gradient")),
        ("random_bcd", lambda: RandomBCD(params, alpha=0.5, seed=9)),
        ("adamw", lambda: torch.optim.AdamW(params)),
    ]
    opt, t = None, 0
    for name, make in phases:
        new = make()
        if opt is not None:
            new.load_state_dict(via_disk(opt.state_dict()))
        opt = new
        group = opt.param_groups[0]
        # The checkpoint's hyperparameters win; keys it lacks come from the new constructor.
        assert group["lr"] == 1e-2 and group["weight_decay"] == 0.05
        if name == "mofo":
            assert group["alpha"] == 0.2 and group["filter"] == "gradient"
        if name == "random_bcd":
            assert group["alpha"] == 0.2 and group["seed"] == 9 and group["exact"] is False
        kind = {"adamw": "all", "mofo": "topk_gradient", "random_bcd": "random"}[name]
        for _ in range(2):
            t += 1
            grads = [torch.randn(s, generator=gen) for s in shapes]
            expected = []
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                p.grad, twins[i].grad = g.clone(), g.clone()
                # The next step from the carried state, by the reference (t continues).
                old = opt.state[p] if opt.state.get(p) else {}
                ref_state = {k: (int(v) if k == "step" else v.double()) for k, v in old.items()}
                ref_p = p.detach().double().clone()
                reference_step(
                    ref_p,
                    g,
                    ref_state,
                    lr=1e-2,
                    beta1=0.9,
                    beta2=0.999,
                    eps=1e-8,
                    weight_decay=0.05,
                    selection=kind,
                    alpha=group.get("alpha", 1.0),
                    seed=group.get("seed", 0),
                    tensor_index=i,
                )
                expected.append(ref_p)
            opt.step()
            adamw_twin.step()
            for p, twin, ref_p in zip(params, twins, expected, strict=True):
                mine, theirs = opt.state[p], adamw_twin.state[twin]
                assert int(mine["step"]) == int(theirs["step"]) == t
                assert mine["exp_avg"].dtype == torch.float32
                # Moments never depend on the selection: bit-identical to uninterrupted AdamW.
                assert torch.equal(mine["exp_avg"], theirs["exp_avg"])
                assert torch.equal(mine["exp_avg_sq"], theirs["exp_avg_sq"])
                torch.testing.assert_close(p.detach().double(), ref_p, rtol=1e-6, atol=1e-6)
    # Partial updates happened: the switched run is not simply AdamW.
    assert any(not torch.equal(p, q) for p, q in zip(params, twins, strict=True))


def test_half_adam_entry_masks_survive_a_state_dict_round_trip_across_new_round():
    # strategy="parameter": the masks are keyed by the round; freeze="mask" keeps requires_grad.
    def make(model):
        return HalfAdam(model.named_parameters(), lr=1e-2, strategy="parameter", freeze="mask", seed=3)

    def train(model, opt, batches):
        for i in batches:
            opt.zero_grad()
            nn.functional.mse_loss(model(X + i), Y).backward()
            opt.step()

    straight = mlp()
    opt = make(straight)
    train(straight, opt, range(2))
    opt.new_round()
    train(straight, opt, range(2, 6))

    model = mlp()
    first = make(model)
    train(model, first, range(2))
    round0 = via_disk(first.state_dict())
    first.new_round()
    train(model, first, range(2, 4))
    saved = via_disk({"model": model.state_dict(), "opt": first.state_dict()})

    resumed = mlp(seed=1)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    assert opt2.round == 1 and all(p.requires_grad for p in resumed.parameters())
    train(resumed, opt2, range(4, 6))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)

    # Going back: a round-0 state dict restores round 0 (and its masks) in a round-1 optimizer.
    back = make(mlp(seed=1))
    back.new_round()
    back.load_state_dict(round0)
    assert back.round == 0 and {int(s["step"]) for s in back.state.values()} == {2}


def _named_model():
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


WEIGHTS_ONLY_CASES = {
    "mofo_blocks": lambda m: MoFO(m.parameters(), alpha=0.3, block_size=5, weight_decay=0.1),
    "mofo_param_groups": lambda m: MoFO(mofo_param_groups(m.named_parameters(), weight_decay=0.1), alpha=0.2),
    "random_bcd_exact": lambda m: RandomBCD(m.parameters(), alpha=0.3, exact=True, mask_weight_decay=False),
    "half_adam_classify_hook": lambda m: HalfAdam(
        m.named_parameters(), strategy="model", classify=lambda name, module=None: None
    ),
}


@pytest.mark.parametrize("name", list(WEIGHTS_ONLY_CASES))
def test_state_dicts_load_with_weights_only(name):
    model = _named_model()
    opt = WEIGHTS_ONLY_CASES[name](model)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 4)).pow(2).sum().backward()
        opt.step()
    state = opt.state_dict()
    loaded = via_disk(state)  # raises on anything but tensors and plain containers
    fresh = WEIGHTS_ONLY_CASES[name](_named_model())
    fresh.load_state_dict(loaded)
    # (torch's load_state_dict adds its own "differentiable": False key to each group)
    assert [
        {k: v for k, v in g.items() if k != "differentiable"} for g in fresh.state_dict()["param_groups"]
    ] == state["param_groups"]
    for a, b in zip(fresh.state_dict()["state"].values(), state["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)


# ============================================================================ 4. DCP


@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        dist.destroy_process_group()


DCP_FACTORIES = {
    "mofo": lambda m: MoFO(m.parameters(), lr=1e-2, alpha=0.25, weight_decay=0.1, mask_weight_decay=False),
    "random_bcd": lambda m: RandomBCD(
        m.parameters(), lr=1e-2, alpha=0.3, seed=1, weight_decay=0.1, mask_weight_decay=False
    ),
    "half_adam": lambda m: HalfAdam(
        m.named_parameters(), lr=1e-2, strategy="model", seed=0, weight_decay=0.1
    ),
    "half_adam_entries": FACTORIES["half_adam"],
}


def _train(model, opt, batches):
    for i in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(X + i), Y).backward()
        opt.step()


def dcp_resume(make, path, *, rounds_before_save=0, new_rounds_on_fresh=0):
    """Train 6 steps straight; train 3, DCP-save, DCP-load into a fresh model + optimizer
    (no optimizer state yet), train 3 more; the two runs must agree bit for bit."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def run(model, opt, batches):
        for i in batches:
            if rounds_before_save and i == 1:
                opt.new_round()
            _train(model, opt, [i])

    straight = mlp(widths=(8, 16, 16, 4))
    opt = make(straight)
    run(straight, opt, range(6))

    model = mlp(widths=(8, 16, 16, 4))
    first = make(model)
    run(model, first, range(3))
    model_sd, optim_sd = get_state_dict(model, first)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))

    fresh = mlp(seed=7, widths=(8, 16, 16, 4))
    opt2 = make(fresh)
    for _ in range(new_rounds_on_fresh):
        opt2.new_round()
    before = [p.detach().clone() for p in fresh.parameters()]
    assert len(opt2.state) == 0
    model_sd, optim_sd = get_state_dict(fresh, opt2)  # steps once with lr=0 and zero grads
    assert all(torch.equal(p, b) for p, b in zip(fresh.parameters(), before, strict=True)), (
        "DCP's init step moved a parameter"
    )
    assert steps_of(opt2) and set(steps_of(opt2)) == {1}
    assert all(p.grad is None for p in fresh.parameters())
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    set_state_dict(fresh, opt2, model_state_dict=model_sd, optim_state_dict=optim_sd)
    assert opt2.param_groups[0]["lr"] == 1e-2
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
        if first.state.get(p):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt2.state[q][key], first.state[p][key]), key
            assert opt2.state[q]["exp_avg"].dtype == torch.float32
    run(fresh, opt2, range(3, 6))
    for a, b in zip(straight.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("name", list(DCP_FACTORIES))
def test_dcp_save_load_into_a_fresh_optimizer_resumes_exactly(name, tmp_path):
    dcp_resume(DCP_FACTORIES[name], tmp_path)


@pytest.mark.parametrize("name", ["mofo", "half_adam"])
def test_dcp_with_a_one_rank_gloo_process_group(name, tmp_path, gloo_group):
    dcp_resume(DCP_FACTORIES[name], tmp_path)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_half_adam_after_new_round_needs_the_fresh_optimizer_in_the_same_round(tmp_path):
    # DCP loads into the fresh optimizer's own state layout, and a HalfAdam holds state only
    # for its current half: bring the fresh optimizer to the saved round first.
    dcp_resume(DCP_FACTORIES["half_adam"], tmp_path, rounds_before_save=1, new_rounds_on_fresh=1)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_half_adam_after_new_round_into_an_optimizer_built_in_that_round(tmp_path):
    # HalfAdam(round=N): the documented way to resume a later round through DCP.
    built = []

    def make(m):  # the third optimizer dcp_resume builds is the fresh one that loads round 1
        opt = HalfAdam(
            m.named_parameters(),
            lr=1e-2,
            strategy="model",
            seed=0,
            weight_decay=0.1,
            round=1 if len(built) == 2 else 0,
        )
        built.append(opt)
        return opt

    dcp_resume(make, tmp_path, rounds_before_save=1)


# ============================================================================ 5. lr = 0


LR0_CASES = {
    "mofo_decay_all": lambda ps: MoFO(ps, lr=1e-2, alpha=0.2, weight_decay=0.5, mask_weight_decay=False),
    "random_bcd_decay_all": lambda ps: RandomBCD(
        ps, lr=1e-2, alpha=0.4, weight_decay=0.5, mask_weight_decay=False
    ),
    "half_adam_decay": lambda ps: HalfAdam(ps, lr=1e-2, ratio=0.5, strategy="parameter", weight_decay=0.5),
    "mofo_alpha_one": lambda ps: MoFO(ps, lr=1e-2, alpha=1.0, weight_decay=0.5),
}


@pytest.mark.filterwarnings("ignore:HalfAdam got parameters without names")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(LR0_CASES))
def test_lr_zero_zero_grads_with_weight_decay_and_existing_state_change_no_parameter(name, dtype):
    gen = torch.Generator().manual_seed(8)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(6, 5), (13,)]]
    opt = LR0_CASES[name](params)
    for fresh_state in (True, False):  # DCP's case (no state yet), then with nonzero moments
        before = [p.detach().clone() for p in params]
        for group in opt.param_groups:
            group["lr"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True)), fresh_state
        for group in opt.param_groups:
            group["lr"] = 1e-2
        for _ in range(2):  # real steps: moments become nonzero
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
    assert any(float(s["exp_avg"].abs().max()) > 0 for s in opt.state.values())
