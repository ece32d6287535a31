"""maskopt.telemetry: update counts equal the entries each step really changed; distance from
θ0; no host-device sync in the step hook; the Hugging Face Trainer callback."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_models import TokenData, tiny_llama

from maskopt import HalfAdam, MoFO, RandomBCD, _hash, topk_count
from maskopt import telemetry as tm
from maskopt.telemetry import UpdateTelemetry, to_floats

SHAPES = [(17, 33), (64,), (5, 123), (1,), (3, 4, 5), (0,)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def positive_grads(params, g, only=None):
    """Gradients in [0.5, 1.5): the momentum never changes sign, so every selected entry's
    Adam update is at least ~lr/3 and really changes the (O(1), fp32) parameter."""
    for p in params:
        if only is None or only(p):
            p.grad = (torch.rand(p.shape, generator=g) + 0.5).to(p.dtype)


def as_ints(counts):
    return {k: int(v) for k, v in counts.items()}


def check_counts_match_changes(opt, params, names=None, steps=4, only=None, expect=None):
    """Per step: counts recorded by the telemetry == entries whose value changed."""
    tel = UpdateTelemetry(opt, None if names is None else zip(names, params, strict=True))
    keys = list(range(len(params))) if names is None else names
    g = torch.Generator().manual_seed(1)
    seen = []
    for step in range(steps):
        positive_grads(params, g, only)
        before = [p.detach().clone() for p in params]
        opt.step()
        changed = {k: int((p.detach() != b).sum()) for k, p, b in zip(keys, params, before, strict=True)}
        counts = tel.updated_counts()
        for v in counts.values():
            assert isinstance(v, (int, torch.Tensor))
        assert as_ints(counts) == changed, f"step {step}"
        if expect is not None:
            assert as_ints(counts) == expect(step), f"step {step}"
        seen.append(changed)
        opt.zero_grad()
    assert tel.steps == steps
    tel.remove()
    return seen


@pytest.mark.parametrize("filt", ["momentum", "gradient"])
@pytest.mark.parametrize("block_size", [None, 48])
def test_mofo_counts(filt, block_size):
    params = make_params()
    alpha = 0.2
    opt = MoFO(params, lr=1e-2, alpha=alpha, filter=filt, block_size=block_size)

    def expected(step):
        out = {}
        for i, p in enumerate(params):
            n = p.numel()
            b = n if block_size is None else min(block_size, n)
            out[i] = (
                0 if n == 0 else (n // b) * topk_count(b, alpha) + (topk_count(n % b, alpha) if n % b else 0)
            )
        return out

    check_counts_match_changes(opt, params, expect=expected)


def test_mofo_param_groups_alpha_one_and_no_grad():
    params = make_params()
    opt = MoFO([{"params": params[:2], "alpha": 1.0}, {"params": params[2:], "alpha": 0.1}], lr=1e-2)
    # params[4] never gets a gradient: 0 entries updated
    seen = check_counts_match_changes(opt, params, only=lambda p: p is not params[4])
    assert seen[0][0] == params[0].numel() and seen[0][4] == 0


def test_mofo_unmasked_weight_decay_counts_every_entry():
    params = make_params()
    opt = MoFO(params, lr=1e-2, alpha=0.1, weight_decay=0.1, mask_weight_decay=False)
    seen = check_counts_match_changes(opt, params, steps=2)
    assert seen[0] == {i: p.numel() for i, p in enumerate(params)}


@pytest.mark.parametrize("exact", [False, True])
def test_random_bcd_counts(exact):
    params = make_params(shapes=SHAPES + [(300, 7)])
    opt = RandomBCD(params, lr=1e-2, alpha=0.3, seed=7, exact=exact)
    seen = check_counts_match_changes(opt, params, steps=5)
    big = len(params) - 1
    if exact:
        assert all(s[big] == topk_count(2100, 0.3) for s in seen)
    else:  # a fresh draw every step: the counts vary around alpha * n
        assert len({s[big] for s in seen}) > 1
        assert all(abs(s[big] - 630) < 120 for s in seen)


def test_random_counts_chunked(monkeypatch):
    monkeypatch.setattr(tm, "_CHUNK", 100)  # several chunks per tensor
    params = make_params()
    opt = RandomBCD(params, lr=1e-2, alpha=0.25, seed=3)
    check_counts_match_changes(opt, params, steps=2)


def test_adamw_counts():
    params = make_params()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    check_counts_match_changes(
        opt,
        params,
        steps=2,
        only=lambda p: p is not params[1],
        expect=lambda s: {i: 0 if i == 1 else p.numel() for i, p in enumerate(params)},
    )


# -- HalfAdam on a real transformer's parameter names ----------------------------------------


@pytest.mark.parametrize("freeze", ["requires_grad", "mask"])
def test_half_adam_counts(freeze):
    model = tiny_llama(2, vocab=64)
    names, params = zip(*model.named_parameters(), strict=True)
    opt = HalfAdam(model.named_parameters(), lr=1e-2, freeze=freeze)
    # autograd gives gradients to requires_grad tensors only
    seen = check_counts_match_changes(opt, list(params), list(names), steps=2, only=lambda p: p.requires_grad)
    for name, p in zip(names, params, strict=True):
        expected = p.numel() if name in opt.plan.trainable else 0
        assert seen[0][name] == expected, name
    assert 0 < sum(seen[0].values()) < sum(p.numel() for p in params)


def test_half_adam_parameter_strategy_counts():
    model = tiny_llama(2, vocab=64)
    names, params = zip(*model.named_parameters(), strict=True)
    opt = HalfAdam(model.named_parameters(), lr=1e-2, strategy="parameter", freeze="mask")
    seen = check_counts_match_changes(opt, list(params), list(names), steps=2)
    layer = next(n for n in names if n.startswith("model.layers.") and n.endswith("q_proj.weight"))
    assert 0 < seen[0][layer] < dict(zip(names, params, strict=True))[layer].numel()
    assert seen[0][layer] == seen[1][layer]  # the same mask all round


def test_names_from_param_groups_and_unnamed():
    model = tiny_llama(2, vocab=64)
    opt = HalfAdam(model.named_parameters(), lr=1e-2)
    tel = UpdateTelemetry(opt)  # HalfAdam keeps param_names in its groups
    assert tel.names == [n for n, _ in model.named_parameters()]
    opt2 = MoFO(model.parameters(), lr=1e-2)
    assert UpdateTelemetry(opt2).names == list(range(len(list(model.parameters()))))


# -- no sync in the hook ------------------------------------------------------------------------


class _NoHostRead:
    """Makes every way of reading a tensor's value on the host raise."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        def boom(*a, **k):
            raise AssertionError("host read of a tensor value")

        for m in self.METHODS:
            self.mp.setattr(torch.Tensor, m, boom)

    def __exit__(self, *exc):
        self.mp.undo()


def test_hook_records_only_ints_and_lazy_masks():
    params = make_params()
    for opt in (MoFO(params, lr=1e-2), RandomBCD(params, lr=1e-2), torch.optim.AdamW(params)):
        tel = UpdateTelemetry(opt)
        positive_grads(params, torch.Generator().manual_seed(0))
        opt.step()
        for r in tel._records:
            assert isinstance(r, (int, tm._HashMask)) and not isinstance(r, bool)
        for v in tel.updated_counts().values():
            assert isinstance(v, int) or (torch.is_tensor(v) and v.dim() == 0)
        tel.remove()


def test_hook_and_summary_never_read_device_values(monkeypatch):
    """Step counters on a device (as on the fused path): simulated with the meta device, whose
    values cannot be read at all, plus a patch that makes any host read raise."""
    params = make_params()
    opt = RandomBCD(params, lr=1e-2, alpha=0.3)
    tel = UpdateTelemetry(opt)
    positive_grads(params, torch.Generator().manual_seed(0))
    opt.step()
    for p in params:
        opt.state[p]["step"] = opt.state[p]["step"].to("meta")
    opt.found_inf = torch.zeros((), device="meta")
    with _NoHostRead(monkeypatch):
        tel._after_step(opt, (), {})
        values = tel.summary(per_tensor=True)
    del opt.found_inf
    assert all(isinstance(v, (int, float)) or v.device.type == "meta" for v in values.values())
    assert any(torch.is_tensor(v) for v in values.values())


def test_device_key_path_matches_host_hash():
    for seed, index, counter in [(0, 0, 1), (7, 3, 12), (2**40 + 5, 123, 2**24 - 1)]:
        key = _hash.stream_key_tensor(seed, index, torch.tensor(float(counter)))
        assert key.dtype == torch.int32
        assert int(key) & _hash.MASK32 == _hash.stream_key(seed, index, counter)
        host = _hash.stream_key(seed, index, counter)
        for n, start in [(1000, 0), (37, 5000), (10, (1 << 31) - 4), (10, (1 << 32) - 3)]:
            torch.testing.assert_close(
                _hash._order_keys_torch(n, key, "cpu", start),
                _hash.order_keys(n, host, "cpu", start),
                rtol=0,
                atol=0,
            )


def test_device_counters_give_the_same_counts():
    params = make_params()
    opt = RandomBCD(params, lr=1e-2, alpha=0.3)
    tel = UpdateTelemetry(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        positive_grads(params, g)
        opt.step()
    host = as_ints(tel.updated_counts())
    for r in tel._records:
        if isinstance(r, tm._HashMask):
            r.counter = torch.tensor(float(r.counter))  # as a device snapshot would be
    tel._counts = None
    assert as_ints(tel.updated_counts()) == host


def test_skipped_step_counts_zero():
    params = make_params()
    opt = MoFO(params, lr=1e-2)
    tel = UpdateTelemetry(opt)
    positive_grads(params, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in params]
    opt.found_inf = torch.ones(())  # what GradScaler passes to a step that can skip itself
    opt.step()
    del opt.found_inf
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert set(as_ints(tel.updated_counts()).values()) == {0}


# -- distance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reference_device", [None, "cpu"])
def test_distance_matches_manual(reference_device, monkeypatch):
    monkeypatch.setattr(tm, "_CHUNK", 256)  # the chunked path on the bigger tensors
    params = make_params(shapes=[(17, 33), (64,), (5, 123), (0,)])
    params.append(torch.nn.Parameter(torch.randn(40, 9).to(torch.bfloat16)))
    theta0 = [p.detach().clone() for p in params]
    opt = MoFO(params, lr=1e-2, alpha=0.1)
    names = [f"t{i}" for i in range(len(params))]
    with UpdateTelemetry(
        opt, zip(names, params, strict=True), track_distance=True, reference_device=reference_device
    ) as tel:
        d0 = to_floats(tel.distance())
        assert set(d0.values()) == {0.0}
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            positive_grads(params, g)
            opt.step()
        dist = tel.distance()
        frac = tel.changed_fraction()
        assert all(torch.is_tensor(v) for v in dist.values())
        diffs = [(p.detach().double() - t.double()) for p, t in zip(params, theta0, strict=True)]
        for n, d, p, t in zip(names, diffs, params, theta0, strict=True):
            assert math.isclose(float(dist[n]), float(d.norm()), rel_tol=1e-5, abs_tol=1e-12), n
            if p.numel():
                assert math.isclose(float(frac[n]), float((p.detach() != t).double().mean()), rel_tol=1e-6), n
        total = sum(p.numel() for p in params)
        s = tel.as_dict(per_tensor=True, prefix="x/")
        assert all(isinstance(v, float) for v in s.values())
        assert math.isclose(
            s["x/distance"], math.sqrt(sum(float(d.square().sum()) for d in diffs)), rel_tol=1e-5
        )
        moved = sum(int((p.detach() != t).sum()) for p, t in zip(params, theta0, strict=True))
        assert math.isclose(s["x/changed_fraction"], moved / total, rel_tol=1e-6)
        assert 0.1 < s["x/changed_fraction"] < 0.6  # 5 MoFO steps at alpha 0.1
        assert math.isclose(
            s["x/updated_fraction_total"], sum(topk_count(p.numel(), 0.1) for p in params) / total
        )
        assert s["x/distance/t0"] == pytest.approx(float(diffs[0].norm()), rel=1e-5)
        tel.reset_reference()
        assert to_floats(tel.summary())["distance"] == 0.0
    assert tel.removed and tel._reference is None
    with pytest.raises(RuntimeError, match="track_distance"):
        tel.distance()


def test_remove_stops_recording():
    params = make_params()
    opt = MoFO(params, lr=1e-2)
    tel = UpdateTelemetry(opt)
    positive_grads(params, torch.Generator().manual_seed(0))
    opt.step()
    tel.remove()
    opt.step()
    assert tel.steps == 1 and tel.summary()["updated_entries"] == sum(
        topk_count(p.numel(), 0.1) for p in params
    )
    assert tel.summary()  # still readable; no distance keys without tracking
    assert "distance" not in tel.summary()


def test_param_group_added_later_is_followed():
    params = make_params()
    opt = MoFO(params[:3], lr=1e-2, alpha=0.5)
    tel = UpdateTelemetry(opt, track_distance=True)
    opt.add_param_group({"params": params[3:]})
    positive_grads(params, torch.Generator().manual_seed(0))
    opt.step()
    assert len(tel.updated_counts()) == len(params)
    assert len(tel.distance()) == len(params)


# -- the Trainer callback ----------------------------------------------------------------------


def test_import_does_not_need_transformers():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None; import maskopt, maskopt.telemetry as t; "
        "assert hasattr(t, 'UpdateTelemetry')\ntry:\n    import maskopt.hf_callback\nexcept ImportError:\n    print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def _trainer(tmp_path, model, opt, callbacks=None):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        logging_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=TokenData(vocab=64), optimizers=(opt, None), callbacks=callbacks
    )


def test_trainer_callback_logs(tmp_path):
    model = tiny_llama(2, vocab=64)
    from maskopt.hf_callback import UpdateTelemetryCallback

    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, model, MoFO(model.parameters(), lr=1e-2, alpha=0.2))
    cb = UpdateTelemetryCallback.add_to(trainer, track_distance=True, per_tensor=True)
    assert trainer.callback_handler.callbacks[0] is cb
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    names = [n for n, _ in model.named_parameters()]
    for h in logs:
        for key in ("updated_fraction_mean", "updated_fraction_total", "distance", "changed_fraction"):
            assert isinstance(h[f"maskopt/{key}"], float), key
        assert h["maskopt/updated_fraction_mean"] == pytest.approx(0.2, abs=0.02)
        assert h["maskopt/updated_fraction_total"] == pytest.approx(0.2, abs=0.01)
        assert f"maskopt/updated_fraction/{names[0]}" in h and f"maskopt/distance/{names[-1]}" in h
    assert 0 < logs[0]["maskopt/distance"] < logs[1]["maskopt/distance"]
    final = trainer.state.log_history[-1]
    assert "train_loss" in final
    manual = math.sqrt(
        sum(
            float((p.detach().double() - theta0[n].double()).square().sum())
            for n, p in model.named_parameters()
        )
    )
    assert final["maskopt/distance"] == pytest.approx(manual, rel=1e-5)
    assert cb.telemetry.steps == 4 and cb.telemetry.removed  # unhooked at on_train_end


def test_trainer_callback_in_callbacks_list_with_half_adam(tmp_path):
    model = tiny_llama(2, vocab=64)
    from maskopt.hf_callback import UpdateTelemetryCallback

    opt = HalfAdam(model.named_parameters(), lr=1e-2)
    cb = UpdateTelemetryCallback(prefix="t/")
    trainer = _trainer(tmp_path, model, opt, callbacks=[cb])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    trained = sum(p.numel() for n, p in model.named_parameters() if n in opt.plan.trainable)
    total = sum(p.numel() for p in model.parameters())
    for h in logs:
        assert h["t/updated_fraction_total"] == pytest.approx(trained / total, rel=1e-6)
        assert 0 < h["t/updated_fraction_mean"] < 1
        assert "t/distance" not in h  # distance is opt-in


# -- CUDA: no synchronisation in the hook or in summary(sync=False) --------------------------


class _StrictTelemetry(UpdateTelemetry):
    """Any CUDA synchronisation inside the step hook raises (torch's sync debug mode)."""

    def _after_step(self, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            super()._after_step(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["random", "random_exact", "mofo", "adamw"])
def test_cuda_counts_without_sync(fused, kind):
    from maskopt.optimizer import fused_available

    if fused and not fused_available(torch.device("cuda")):
        pytest.skip("fused path unavailable (Triton)")
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(shapes=SHAPES + [(1000, 37)])]
    if kind == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, fused=fused)
    elif kind == "mofo":
        opt = MoFO(params, lr=1e-2, alpha=0.2, block_size=48, fused=fused)
    else:
        opt = RandomBCD(params, lr=1e-2, alpha=0.3, seed=5, exact=kind == "random_exact", fused=fused)
    tel = _StrictTelemetry(opt, track_distance=True, reference_device="cpu")
    theta0 = [p.detach().clone() for p in params]
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(3):
        for p in params:
            p.grad = torch.rand(p.shape, generator=g, device="cuda") + 0.5
        before = [p.detach().clone() for p in params]
        opt.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            values = tel.summary(per_tensor=True)  # device tensors, no sync
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts = as_ints(tel.updated_counts())
        assert counts == {
            i: int((p != b).sum()) for i, (p, b) in enumerate(zip(params, before, strict=True))
        }, step
        floats = to_floats(values)
        manual = math.sqrt(
            sum(
                float((p.detach().double() - t.double()).square().sum())
                for p, t in zip(params, theta0, strict=True)
            )
        )
        assert floats["distance"] == pytest.approx(manual, rel=1e-5)
    if fused and kind == "random":  # the fused path keeps step counters on the GPU
        assert any(
            torch.is_tensor(r.counter) and r.counter.is_cuda
            for r in tel._records
            if isinstance(r, tm._HashMask)
        )
    tel.remove()


def test_bad_arguments_name_the_argument():
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="reference_device"):
        UpdateTelemetry(MoFO([p]), reference_device="nowhere")
    with pytest.raises(ValueError, match="named_parameters"):
        UpdateTelemetry(MoFO([p]), named_parameters=[("a", torch.nn.Parameter(torch.zeros(1)))])
    with pytest.raises(TypeError, match="Optimizer"):
        UpdateTelemetry("not an optimizer")
