"""Flat partitions in place of the model's tensors that are not DeepSpeed ZeRO's (FSDP1's, or
a flattening without DeepSpeed's mapping back to the tensors): maskopt refuses to step on them
rather than silently selecting per partition. DeepSpeed ZeRO itself is tested in
tests/distributed/test_deepspeed.py."""

import pytest
import torch

from maskopt import HalfAdam, MoFO, RandomBCD


def _zero_style_flatten(opt):
    """What DeepSpeed's ZeRO-1/2 optimizer does to the client optimizer's groups (one flat fp32
    partition per param group replaces the group's tensors), without the attributes DeepSpeed
    sets on the tensors to map the partition back to them."""
    for group in opt.param_groups:
        flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1).float() for p in group["params"]]))
        flat.grad = torch.ones_like(flat)
        group["params"] = [flat]


@pytest.mark.filterwarnings("ignore:HalfAdam got parameters without names")
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: MoFO(ps, alpha=0.1),
        lambda ps: RandomBCD(ps, alpha=0.1),
        lambda ps: HalfAdam(ps, freeze="mask"),
    ],
    ids=["mofo", "random_bcd", "half_adam"],
)
def test_flat_partitions_are_refused_before_anything_changes(make):
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = make(params)
    _zero_style_flatten(opt)
    flat = opt.param_groups[0]["params"][0]
    before = flat.detach().clone()
    with pytest.raises(RuntimeError, match="DeepSpeed ZeRO"):
        opt.step()
    assert torch.equal(flat.detach(), before)
    assert len(opt.state) == 0


def test_added_groups_and_state_dict_round_trips_still_step():
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(3, 3))
    opt = MoFO([a], alpha=0.5)
    opt.add_param_group({"params": [b]})
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    fresh = MoFO([a], alpha=0.5)
    fresh.add_param_group({"params": [b]})
    fresh.load_state_dict(opt.state_dict())
    fresh.step()
    import copy

    clone = copy.deepcopy(fresh)  # goes through __setstate__, which re-registers the copies
    clone.step()
