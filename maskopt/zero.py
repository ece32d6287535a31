"""DeepSpeed ZeRO (stages 1, 2 and 3): the per-tensor selection on flat partitions.

DeepSpeed keeps the client optimizer object but steps it on flat fp32 partitions of many
tensors. ZeRO-1/2 (and its ``BF16_Optimizer``) put one flat partition per param group in
place of the group's tensors and call ``step()`` per group (or once for all groups); ZeRO-3
puts a sub-group's flat partition into its param group during each ``step()``. Optimizer
state is keyed by the flat partition.

Of every tensor, a rank's flat partition holds at most one contiguous range of the tensor's
flat indices: a *fragment*. That is exactly what :class:`maskopt.distributed.Shard`
describes, so the FSDP2 path's selection applies unchanged: MoFO's top-k over the whole
tensor with its radix histograms all-reduced (ties to the lowest global index), RandomBCD's
hash on global indices. A rank that holds none of a tensor takes part with an empty fragment,
so every rank makes the same collective calls.

Where each tensor lies is read from the attributes DeepSpeed sets on the model's tensors (the
ones the optimizer was built with), at every step, because DeepSpeed re-links them after a
checkpoint load:

* ZeRO-1/2: ``p._hp_mapping`` (None when this rank holds none of ``p``):
  ``hp_fragment_address.start`` is the fragment's offset in the flat partition and
  ``lp_fragment_address`` its range of ``p``'s flat indices; ``p._dp_group`` is the process
  group of the partition.
* ZeRO-3: ``p._z3_optimizer``, whose ``grad_position[get_param_id(p)]`` gives ``p``'s
  sub-group and the offset of its slot in that sub-group's flat partition. Each rank holds
  ``p.ds_tensor.ds_numel`` entries of ``p`` from ``rank * p.ds_tensor.ds_numel`` on; the slot
  is padded past ``p.ds_numel``.

Step counters: the state of a flat partition has one ``step``, shared by its fragments. That
equals each tensor's own counter of docs/semantics.md because every fragment of a partition
steps together: DeepSpeed hands every trainable tensor a gradient at every step (zeros when it
took no part in the loss), and a tensor left out (``requires_grad=False``, or frozen by
HalfAdam in this round) is left out for the whole round, whose start clears the state. Bias
corrections and RandomBCD's hash counter derive from that counter, as everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import distributed
from ._checks import check_gradient
from .functional import masked_adamw, use_fused
from .policy import SelectionPolicy

__all__ = ["Fragment", "fragments", "plan_partitions", "ZeroStep"]


@dataclass(frozen=True)
class Fragment:
    """The entries of one tensor that a flat ZeRO partition holds on this rank.

    Args:
        param: the tensor the optimizer was built with (a model parameter).
        start: offset of the first entry in the flat partition.
        numel: number of entries held here (0 when this rank holds none of ``param``).
        shard: where those entries sit in the whole tensor, and the process group of the
            selection's collectives.
    """

    param: torch.Tensor
    start: int
    numel: int
    shard: distributed.Shard


def _zero3_optimizer(params: Sequence[torch.Tensor]):
    return next(
        (p._z3_optimizer for p in params if hasattr(p, "ds_id") and hasattr(p, "_z3_optimizer")), None
    )


def _in_partition(p: torch.Tensor, z3) -> bool:
    """Whether DeepSpeed put ``p`` in one of its flat partitions (it leaves out tensors that
    were frozen or empty when the engine was built)."""
    if z3 is not None:
        return hasattr(p, "ds_id") and z3.get_param_id(p) in z3.grad_position
    return hasattr(p, "_hp_mapping") and hasattr(p, "_dp_group")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _zero12_fragments(flat: torch.Tensor, built: Sequence[torch.Tensor]) -> list[Fragment] | None:
    out = []
    for p in built:
        if not _in_partition(p, None):
            continue
        # attributes DeepSpeed gives the tensors it partitions, which torch's stubs cannot know
        mapping, dp_group = p._hp_mapping, p._dp_group  # type: ignore[attr-defined]  # DeepSpeed's
        if mapping is None:  # this rank holds none of p
            out.append(Fragment(p, 0, 0, distributed.Shard(p.numel(), 0, dp_group)))
            continue
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        if (
            not _same_storage(mapping.hp_fragment, flat)
            or hp.numel != lp.numel
            or hp.start + hp.numel > flat.numel()
            or lp.start + lp.numel > p.numel()
        ):
            return None
        out.append(
            Fragment(p, int(hp.start), int(hp.numel), distributed.Shard(p.numel(), int(lp.start), dp_group))
        )
    return out


def _zero3_fragments(flat: torch.Tensor, built: Sequence[torch.Tensor], z3) -> list[Fragment] | None:
    sub_group = next((i for i, t in enumerate(z3.fp32_partitioned_groups_flat) if t is flat), None)
    if sub_group is None:
        return None
    out = []
    for p in built:
        if not _in_partition(p, z3):
            continue
        group_id, offset, slot = z3.grad_position[z3.get_param_id(p)]
        if group_id != sub_group:
            continue  # stepped with its own sub-group
        # attributes DeepSpeed gives the tensors it partitions, which torch's stubs cannot know
        whole_numel, partition_numel = p.ds_numel, p.ds_tensor.ds_numel  # type: ignore[attr-defined]  # DeepSpeed's
        start = z3._get_param_partition_rank(p) * partition_numel
        numel = max(0, min(whole_numel - start, slot))  # the rest of the slot is padding
        if offset + numel > flat.numel():
            return None
        shard = distributed.Shard(whole_numel, start, z3._get_param_partition_group(p))
        out.append(Fragment(p, int(offset), int(numel), shard))
    return out


def fragments(flat: torch.Tensor, built: Sequence[torch.Tensor]) -> list[Fragment] | None:
    """The fragments of ``flat``, a flat partition DeepSpeed ZeRO put into a param group, in
    the order of ``built``; None when ``flat`` is not a ZeRO partition of those tensors.

    Every rank gets one fragment per tensor of the partition (an empty one where it holds
    none), so the lists line up across ranks.

    Args:
        flat: a tensor found in the param group's ``"params"``.
        built: the tensors the group was built with (``MaskedAdam._built_params``).
    """
    z3 = _zero3_optimizer(built)
    if z3 is not None:
        return _zero3_fragments(flat, built, z3)
    if any(hasattr(p, "_hp_mapping") for p in built):
        return _zero12_fragments(flat, built)
    return None


def _not_partitioned(who: str, index: int, p: torch.Tensor) -> RuntimeError:
    shape = tuple(getattr(p, "ds_shape", p.shape))
    return RuntimeError(
        f"{who}: parameter {index} {shape} requires grad and this optimizer trains it, but it is in none of "
        "DeepSpeed's ZeRO partitions: it was frozen (requires_grad=False) when deepspeed.initialize() built "
        "them, so it would never be stepped. HalfAdam(freeze='requires_grad') freezes another half at each "
        "new_round(): build a new optimizer and engine for each round, or use freeze='mask' with one engine."
    )


@dataclass
class _FragmentBucket:
    """Fragments of one param group that share a selection policy."""

    policy: SelectionPolicy
    fused: bool
    entries: list[tuple[torch.Tensor, Fragment]] = field(default_factory=list)  # (flat partition, piece)


class ZeroStep:
    """The planned step of one param group whose tensors are DeepSpeed ZeRO partitions:
    checked, ready to run. Built by :func:`plan_partitions`.

    Args:
        optimizer: the ``MaskedAdam`` that steps.
        group: the param group (its ``moment_dtype`` sets the partitions' moments).
        options: the group's :func:`maskopt.functional.masked_adamw` keyword arguments
            (``maskopt.optimizer.adamw_options``).
    """

    def __init__(self, optimizer, group: dict[str, Any], options: dict[str, Any]) -> None:
        self.optimizer = optimizer
        self.group = group
        self.options = options
        # (flat partition, the tensors of its group) for every partition with a gradient
        self.flats: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self.buckets: dict[SelectionPolicy, _FragmentBucket] = {}

    def run(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        """Create the partitions' state where missing, then step every bucket of fragments.

        Args:
            grad_scale, found_inf: GradScaler's one-element tensors, or None (as for
                :func:`maskopt.functional.masked_adamw`).
        """
        opt = self.optimizer
        states = {}
        for flat, built in self.flats:
            fresh = len(opt.state.get(flat, {})) == 0
            states[flat] = opt._state_for(flat, self.group)
            if fresh:
                _relink_state(flat, states[flat], built)
        stepped: dict[torch.Tensor, torch.Tensor] = {}
        for bucket in self.buckets.values():
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            exp_avgs: list[torch.Tensor] = []
            exp_avg_sqs: list[torch.Tensor] = []
            steps: list[torch.Tensor] = []
            for flat, frag in bucket.entries:
                state = states[flat]
                for out, whole in zip(
                    (params, grads, exp_avgs, exp_avg_sqs),
                    (flat, flat.grad, state["exp_avg"], state["exp_avg_sq"]),
                    strict=True,
                ):
                    out.append(whole.narrow(0, frag.start, frag.numel))
                # One counter per partition: each fragment advances a copy of it, and the
                # partition keeps the result (unchanged when GradScaler skips the step).
                device = flat.device if bucket.fused else state["step"].device
                steps.append(state["step"].to(device, copy=True))
            masked_adamw(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                policy=bucket.policy,
                tensor_indices=[opt.tensor_index(f.param) for _, f in bucket.entries],
                grad_scale=grad_scale,
                found_inf=found_inf,
                shards=[f.shard for _, f in bucket.entries],
                fused=bucket.fused,
                # ZeRO-Offload keeps the partitions in host memory: the compiled CPU step
                cpu_step=self.group.get("fused") is None and self.options.get("foreach") is None,
                **self.options,
            )
            for (flat, _), step in zip(bucket.entries, steps, strict=True):
                stepped[flat] = step
        for flat, step in stepped.items():
            states[flat]["step"].copy_(step)


def _relink_state(flat: torch.Tensor, state: dict, built: Sequence[torch.Tensor]) -> None:
    """Point DeepSpeed's views of each tensor's optimizer state at a partition's new state.

    ZeRO-1/2 take these views once, after the first step, and
    ``safe_get_full_optimizer_state`` reads them; state created again later (HalfAdam's
    new_round clears it) would leave them on the old tensors."""
    for p in built:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None or getattr(mapping, "optim_fragment", None) is None:
            continue  # not linked
        if _same_storage(mapping.hp_fragment, flat):
            mapping.set_optim_state_fragment(flat, state)


def plan_partitions(optimizer, group: dict[str, Any], options: dict[str, Any]) -> ZeroStep | None:
    """Plan the step of a param group whose ``"params"`` are not the tensors it was built with:
    None when they are not DeepSpeed ZeRO partitions of them; otherwise a checked
    :class:`ZeroStep`, having raised before anything changes for anything it cannot step.

    A collective when a ``block_size`` selection is sharded (one all-reduce per process
    group, as :func:`maskopt.distributed.check_block_alignment`): every rank plans the same
    partitions.

    Args:
        optimizer: the ``MaskedAdam`` whose group it is.
        group: the param group, as DeepSpeed left it for this ``step()``.
        options: the group's keyword arguments for :func:`maskopt.functional.masked_adamw`.

    Raises:
        RuntimeError: a tensor the optimizer trains is in no partition (frozen when the engine
            was built); a partition's gradient or state does not match it; ``fused=True``
            where the Triton path cannot run.
        ValueError: ``fused=True`` with a selection that needs the whole tensor;
            ``block_size`` blocks that straddle two ranks' fragments.
    """
    who = type(optimizer).__name__
    built = optimizer._built_params(group)
    found = [(flat, fragments(flat, built)) for flat in group["params"]]
    if any(frags is None for _, frags in found):
        return None
    z3 = _zero3_optimizer(built)
    for p in built:
        numel = p.ds_numel if hasattr(p, "ds_id") else p.numel()
        if p.requires_grad and numel and not _in_partition(p, z3) and optimizer._policy(group, p) is not None:
            raise _not_partitioned(who, optimizer.tensor_index(p), p)
    step = ZeroStep(optimizer, group, options)
    blocked: dict[int, list] = {}
    for flat, frags in found:
        if flat.grad is None:
            continue
        check_gradient(
            who, "a DeepSpeed ZeRO partition", flat, flat.grad, optimizer.state.get(flat, {}).get("exp_avg")
        )
        step.flats.append((flat, built))
        assert frags is not None  # returned above otherwise
        for frag in frags:
            # As in one process, where a tensor without a gradient is not stepped.
            policy = optimizer._policy(group, frag.param) if frag.param.requires_grad else None
            if policy is None:
                continue
            bucket = step.buckets.get(policy)
            if bucket is None:
                fused = use_fused(group.get("fused"), [flat], policy, True, f"{who} (DeepSpeed ZeRO)")
                bucket = step.buckets[policy] = _FragmentBucket(policy, fused)
            bucket.entries.append((flat, frag))
            if policy.block_size and policy.is_topk:
                blocked.setdefault(policy.block_size, []).append(
                    (flat.narrow(0, frag.start, frag.numel), frag.shard)
                )
    for block_size, pairs in sorted(blocked.items()):
        distributed.check_block_alignment(pairs, block_size, f"{who} (DeepSpeed ZeRO)")
    return step
