"""moment_dtype: bfloat16 moments (as torch's fused AdamW keeps for bf16 parameters) on both
paths, against the reference, with AdamW state-dict interop."""

from __future__ import annotations

import pytest
import torch

import maskopt
from maskopt.reference import reference_step
from maskopt.selection import topk_count

HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
CASES = [
    ("MoFO", dict(alpha=0.1)),
    ("MoFO", dict(alpha=0.2, filter="gradient")),
    ("RandomBCD", dict(alpha=0.2, seed=3)),
    ("RandomBCD", dict(alpha=0.2, seed=3, exact=True)),
]


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in ((300, 70), (90,), (5000,))]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


@pytest.mark.parametrize("name,kwargs", CASES)
def test_bf16_moments_are_stored_in_bf16_and_track_the_reference(name, kwargs):
    params = _params()
    opt = getattr(maskopt, name)(params, moment_dtype=torch.bfloat16, fused=False, **HP, **kwargs)
    ref_p = [p.detach().clone() for p in params]
    ref_state = [{} for _ in params]
    selection = {
        "MoFO": "topk_gradient" if kwargs.get("filter") == "gradient" else "topk_momentum",
        "RandomBCD": "random_exact" if kwargs.get("exact") else "random",
    }[name]
    for step in range(3):
        grads = _grads(params, step)
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            mask = reference_step(
                ref_p[i],
                g,
                ref_state[i],
                selection=selection,
                alpha=kwargs["alpha"],
                seed=kwargs.get("seed", 0),
                tensor_index=i,
                lr=HP["lr"],
                beta1=0.9,
                beta2=0.999,
                eps=1e-8,
                weight_decay=0.1,
                moment_dtype=torch.bfloat16,
            )
            moved = p.detach() != before[i]
            if selection.startswith("topk"):
                assert int(moved.sum()) == topk_count(p.numel(), kwargs["alpha"])
            # the reference rounds float64 moments: a tie may fall differently, so compare values
            assert (moved != mask).float().mean() < 0.01
    for p, r, st, rs in zip(params, ref_p, (opt.state[p] for p in params), ref_state, strict=True):
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
        torch.testing.assert_close(st["exp_avg"].double(), rs["exp_avg"], rtol=1.6e-2, atol=1e-6)
        torch.testing.assert_close(st["exp_avg_sq"].double(), rs["exp_avg_sq"], rtol=1.6e-2, atol=1e-6)
        close = torch.isclose(p.detach().double(), r.double(), rtol=1e-2, atol=1e-3)
        assert close.float().mean() > 0.99


def test_float32_and_none_are_the_default():
    a, b = _params(), _params()
    opts = [
        maskopt.MoFO(a, fused=False, **HP),
        maskopt.MoFO(b, fused=False, moment_dtype=torch.float32, **HP),
    ]
    for step in range(2):
        for ps, opt in zip((a, b), opts, strict=True):
            for p, g in zip(ps, _grads(ps, step), strict=True):
                p.grad = g
            opt.step()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
        assert opts[0].state[x]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("bad", [torch.float16, torch.float64, "bfloat16", 2])
def test_other_moment_dtypes_are_refused(bad):
    with pytest.raises(ValueError, match="moment_dtype"):
        maskopt.MoFO(_params(), moment_dtype=bad)


def test_adamw_state_dicts_load_both_ways():
    params = _params()
    adamw = torch.optim.AdamW(params, **HP)
    for p, g in zip(params, _grads(params, 0), strict=True):
        p.grad = g
    adamw.step()
    mofo = maskopt.MoFO(params, moment_dtype=torch.bfloat16, fused=False, **HP)
    mofo.load_state_dict(adamw.state_dict())
    for p in params:
        assert mofo.state[p]["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(
            mofo.state[p]["exp_avg"].float(), adamw.state[p]["exp_avg"], rtol=1e-2, atol=1e-8
        )
    mofo.step()
    back = torch.optim.AdamW(params, **HP)
    back.load_state_dict(mofo.state_dict())
    for p in params:
        assert back.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(back.state[p]["exp_avg"], mofo.state[p]["exp_avg"].float())
    back.step()


def test_bf16_params_with_bf16_moments():
    params = _params(torch.bfloat16)
    opt = maskopt.MoFO(params, moment_dtype=torch.bfloat16, fused=False, **HP)
    for step in range(2):
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = g
        opt.step()
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in params)
    assert all(torch.isfinite(p).all() for p in params)
