"""The PyTorch path: masked Adam on a list of tensors (foreach ops, batched selection).

Same arguments as the Triton launcher ``maskopt.kernels.fused_adam_step_``, so
``maskopt.functional`` dispatches to either without translating.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import _hash
from .policy import SelectionPolicy
from .selection import RANDOM_EXACT, TOPK_MOMENTUM, magnitude_keys, random_indices, topk_indices

if TYPE_CHECKING:
    from .distributed import Shard


def _select(
    policy: SelectionPolicy,
    exp_avgs: list[torch.Tensor],
    grads32: list[torch.Tensor],
    step_values: list[float],
    *,
    tensor_indices: Sequence[int],
    shards: Sequence[Shard | None] | None = None,
) -> Sequence[torch.Tensor | None]:
    """Sorted flat indices of the entries that move this step; None means the whole tensor.

    ``shards`` (maskopt.distributed.Shard or None per tensor) marks local shards of sharded
    tensors: their selection is computed over the whole tensor."""
    if policy.moves_all:
        return [None] * len(exp_avgs)
    # the shards when some tensor is one, else None
    sharded = shards if shards is not None and any(s is not None for s in shards) else None
    if policy.is_topk:
        scores = magnitude_keys(torch._foreach_abs(exp_avgs if policy.kind == TOPK_MOMENTUM else grads32))
        if sharded is not None:
            from .distributed import topk_indices_sharded

            return topk_indices_sharded(scores, sharded, policy.alpha, policy.block_size)
        return topk_indices(scores, policy.alpha, policy.block_size)
    if policy.is_random:
        keys = [
            _hash.stream_key(policy.seed, index, policy.hash_counter(t))
            for index, t in zip(tensor_indices, step_values, strict=True)
        ]
        exact = policy.kind == RANDOM_EXACT
        if sharded is not None:
            from .distributed import random_indices_sharded

            return random_indices_sharded(
                [m.numel() for m in exp_avgs],
                sharded,
                keys,
                policy.alpha,
                exact=exact,
                device=exp_avgs[0].device,
            )
        return random_indices(
            [m.shape for m in exp_avgs], keys, policy.alpha, exact=exact, device=exp_avgs[0].device
        )
    raise ValueError(f"unknown selection {policy.kind!r}")


def masked_adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    policy: SelectionPolicy,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    mask_weight_decay: bool,
    tensor_indices: Sequence[int],
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    shards: Sequence[Shard | None] | None = None,
) -> None:
    """One masked-AdamW step (docs/semantics.md) on the tensors of one param group, in place.

    Args:
        params, grads, exp_avgs, exp_avg_sqs, state_steps: per-tensor lists (plain, local
            tensors); the moments in float32 (float64 for float64 parameters) or bfloat16.
        policy: the ``SelectionPolicy`` shared by all the tensors.
        lr, beta1, beta2, eps, weight_decay, mask_weight_decay: the AdamW hyperparameters.
        tensor_indices: each tensor's index in its optimizer (keys the random masks).
        grad_scale, found_inf: GradScaler's one-element tensors, or None.
        shards: per tensor, a ``maskopt.distributed.Shard`` when it is the local shard of a
            larger tensor (its selection is then taken over the whole tensor), else None.
    """
    if not params:
        return
    if found_inf is not None and bool(found_inf.item()):
        return  # GradScaler found inf/nan: a skipped step changes nothing, counters included.

    # Arithmetic in the moments' dtype (float32 for fp32/bf16/fp16 params, float64 for
    # float64), and in float32 for bfloat16 moments, which are rounded as they are stored.
    stored_m, stored_v = exp_avgs, exp_avg_sqs
    low = [i for i, m in enumerate(exp_avgs) if m.dtype == torch.bfloat16]
    if low:
        exp_avgs = [m.float() if m.dtype == torch.bfloat16 else m for m in exp_avgs]
        exp_avg_sqs = [v.float() if v.dtype == torch.bfloat16 else v for v in exp_avg_sqs]
    grads32 = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs, strict=True)]
    if grad_scale is not None:
        grads32 = list(torch._foreach_div(grads32, grad_scale.item()))

    for step in state_steps:
        step.add_(1)
    step_values = [float(step.item()) for step in state_steps]

    # Moments for every entry, exactly as torch.optim.AdamW's foreach path computes them.
    torch._foreach_lerp_(exp_avgs, grads32, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads32, grads32, 1 - beta2)
    for i in low:  # store rounded; select and update with what is stored
        for work, stored in ((exp_avgs[i], stored_m[i]), (exp_avg_sqs[i], stored_v[i])):
            stored.copy_(work)
            work.copy_(stored)

    selected = _select(policy, exp_avgs, grads32, step_values, tensor_indices=tensor_indices, shards=shards)

    step_sizes = [-lr / (1 - beta1**t) for t in step_values]
    bias_correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in step_values]
    decay = 1 - lr * weight_decay

    # Whole fp32 tensors: in place, op for op as AdamW's foreach path (alpha=1 == AdamW).
    dense = [
        i
        for i, (p, idx) in enumerate(zip(params, selected, strict=True))
        if idx is None and p.dtype == torch.float32
    ]
    if dense:
        dense_params = [params[i] for i in dense]
        denoms = torch._foreach_sqrt([exp_avg_sqs[i] for i in dense])
        torch._foreach_div_(denoms, [bias_correction2_sqrt[i] for i in dense])
        torch._foreach_add_(denoms, eps)
        if weight_decay:
            torch._foreach_mul_(dense_params, decay)
        torch._foreach_addcdiv_(
            dense_params, [exp_avgs[i] for i in dense], denoms, [step_sizes[i] for i in dense]
        )

    # The rest: gather the selected entries, update them in fp32 with the same ops, scatter
    # them back. Unselected entries are never written, so they keep their exact bits.
    dense_set = set(dense)
    for i, (p, idx) in enumerate(zip(params, selected, strict=True)):
        if i in dense_set:
            continue
        if weight_decay and not mask_weight_decay:
            p.mul_(decay)  # the official MoFO code decays every entry
        flat = p.view(-1) if p.is_contiguous() else p.reshape(-1)
        work_dtype = exp_avgs[i].dtype
        if idx is None:
            m, v, theta = exp_avgs[i].reshape(-1), exp_avg_sqs[i].reshape(-1), flat.to(work_dtype)
        else:
            m, v, theta = (
                x.index_select(0, idx) for x in (exp_avgs[i].reshape(-1), exp_avg_sqs[i].reshape(-1), flat)
            )
            theta = theta.to(work_dtype)
        denom = v.sqrt().div_(bias_correction2_sqrt[i]).add_(eps)
        if weight_decay and mask_weight_decay:
            theta = theta * decay
        theta = theta.addcdiv(m, denom, value=step_sizes[i]).to(p.dtype)
        if idx is None:
            flat.copy_(theta)
        else:
            flat.index_copy_(0, idx, theta)
        if flat.data_ptr() != p.data_ptr():
            p.copy_(flat.view(p.shape))
