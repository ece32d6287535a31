"""The PyTorch path: masked Adam on a list of tensors (foreach ops, batched selection).

Same arguments as the Triton launcher ``maskopt.kernels.fused_adam_step_`` so the optimizer
dispatches to either without translating.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _hash
from .selection import ALL, RANDOM, RANDOM_EXACT, TOPK_GRADIENT, TOPK_MOMENTUM, random_masks, topk_masks


def _select(
    selection: str,
    exp_avgs: list[torch.Tensor],
    grads32: list[torch.Tensor],
    step_values: list[float],
    *,
    alpha: float,
    block_size: int | None,
    seed: int,
    tensor_indices: Sequence[int],
    hash_counter: int | None,
) -> list[torch.Tensor | None]:
    """Masks of the entries that move this step; None means the whole tensor."""
    if selection == ALL or (alpha >= 1.0 and selection in (TOPK_MOMENTUM, TOPK_GRADIENT, RANDOM_EXACT)):
        return [None] * len(exp_avgs)
    if selection == TOPK_MOMENTUM:
        return topk_masks(torch._foreach_abs(exp_avgs), alpha, block_size)
    if selection == TOPK_GRADIENT:
        return topk_masks(torch._foreach_abs(grads32), alpha, block_size)
    if selection in (RANDOM, RANDOM_EXACT):
        keys = [
            _hash.stream_key(seed, index, int(t) if hash_counter is None else hash_counter)
            for index, t in zip(tensor_indices, step_values)
        ]
        return random_masks(
            [m.shape for m in exp_avgs], keys, alpha, exact=selection == RANDOM_EXACT, device=exp_avgs[0].device
        )
    raise ValueError(f"unknown selection {selection!r}")


def masked_adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    selection: str,
    alpha: float,
    block_size: int | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    mask_weight_decay: bool,
    seed: int,
    tensor_indices: Sequence[int],
    hash_counter: int | None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One masked-Adam step (DESIGN.md section 3) on all tensors of one param group."""
    if not params:
        return
    if found_inf is not None and bool(found_inf.item()):
        return  # GradScaler found inf/nan: a skipped step changes nothing, counters included.

    grads32 = [g if g.dtype == torch.float32 else g.float() for g in grads]
    if grad_scale is not None:
        grads32 = torch._foreach_div(grads32, grad_scale.item())

    for step in state_steps:
        step.add_(1)
    step_values = [float(step.item()) for step in state_steps]

    # Moments for every entry, exactly as torch.optim.AdamW's foreach path computes them.
    torch._foreach_lerp_(exp_avgs, grads32, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads32, grads32, 1 - beta2)

    masks = _select(
        selection, exp_avgs, grads32, step_values, alpha=alpha, block_size=block_size,
        seed=seed, tensor_indices=tensor_indices, hash_counter=hash_counter,
    )

    step_sizes = [-lr / (1 - beta1**t) for t in step_values]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in step_values])
    torch._foreach_add_(denoms, eps)

    # Dense fp32 tensors are updated in place, op for op as AdamW does (alpha=1 == AdamW).
    dense = [i for i, (p, mask) in enumerate(zip(params, masks)) if mask is None and p.dtype == torch.float32]
    if dense:
        dense_params = [params[i] for i in dense]
        if weight_decay:
            torch._foreach_mul_(dense_params, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(
            dense_params, [exp_avgs[i] for i in dense], [denoms[i] for i in dense], [step_sizes[i] for i in dense]
        )
    if len(dense) == len(params):
        return

    # Masked or low-precision tensors: compute the moved value in fp32, then keep it only on S.
    dense_set = set(dense)
    rest = [i for i in range(len(params)) if i not in dense_set]
    originals = [params[i].float() for i in rest]
    decayed = torch._foreach_mul(originals, 1 - lr * weight_decay) if weight_decay else originals
    moved = torch._foreach_addcdiv(
        decayed, [exp_avgs[i] for i in rest], [denoms[i] for i in rest], [step_sizes[i] for i in rest]
    )
    for j, i in enumerate(rest):
        mask = masks[i]
        if mask is None:
            params[i].copy_(moved[j])
        else:
            unselected = originals[j] if mask_weight_decay else decayed[j]
            params[i].copy_(torch.where(mask, moved[j], unselected))
