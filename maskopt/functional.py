"""The functional form of the masked AdamW step, in the spirit of ``torch.optim``'s functional
AdamW: lists of tensors in, updated in place, no optimizer object.

:func:`masked_adamw` picks the path: the Triton kernels (``maskopt.kernels``, CUDA) or the
PyTorch path (``maskopt.pytorch_path``, any device). The optimizer classes keep the state,
check the arguments and plan the step, then call this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .policy import SelectionPolicy
from .pytorch_path import masked_adam_

__all__ = ["masked_adamw", "fused_available", "use_fused"]

# fused=None picks the Triton path on CUDA (docs/performance.md has the measurements).
FUSED_BY_DEFAULT_ON_CUDA = True
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

FUSED_HINT = (
    "fused=True needs CUDA tensors and Triton installed (`pip install maskopt[triton]`); "
    "on CPU it runs only under TRITON_INTERPRET=1 (the Triton interpreter, for tests)"
)

# Tensors go through the PyTorch path in batches of about this many entries: each batch
# still takes foreach ops and a batched selection, and its m/v/p are still in cache when the
# selection and the update read them again.
_BATCH_ENTRIES = 1 << 16
_SHARDED_BATCH_ENTRIES = 1 << 26


def _kernels():
    try:
        from maskopt import kernels
    except ImportError:  # pragma: no cover - kernels ship with the package
        return None
    return kernels if hasattr(kernels, "fused_adam_step_") else None


def fused_available(device: torch.device) -> bool:
    """Whether the Triton path can run on ``device``.

    Args:
        device: a torch device (CUDA; CPU only under ``TRITON_INTERPRET=1``).
    """
    kernels = _kernels()
    return kernels is not None and bool(kernels.is_available(device))


def fused_by_default(param: torch.Tensor) -> bool:
    """Whether ``fused=None`` takes the Triton path for ``param``.

    Args:
        param: a (local) parameter tensor.
    """
    return (
        FUSED_BY_DEFAULT_ON_CUDA
        and param.is_cuda
        and param.dtype in FUSED_DTYPES
        and fused_available(param.device)
    )


def use_fused(
    fused: bool | None,
    params: Sequence[torch.Tensor],
    policy: SelectionPolicy,
    sharded: bool,
    who: str = "masked_adamw",
    shard_kernels: bool = False,
) -> bool:
    """Whether tensors take the Triton path, refusing what it cannot do.

    Args:
        fused: the ``fused`` option: True (required), False (the PyTorch path) or None (the
            Triton path when every tensor allows it and no selection spans shards it cannot
            handle).
        params: the (local) tensors.
        policy: their selection policy.
        sharded: whether some of the tensors are shards of larger ones (FSDP2, ZeRO).
        who: the name errors start with.
        shard_kernels: the shards are whole-tensor slices in rank order (FSDP2's ``Shard(0)``),
            which the Triton path selects across (DeepSpeed ZeRO's fragments are not).

    Raises:
        ValueError: ``fused=True`` with a selection across shards the Triton path cannot take.
        RuntimeError: ``fused=True`` where the Triton path cannot run.
    """
    across_shards = sharded and not policy.moves_all and not shard_kernels
    if fused is None:
        return not across_shards and all(fused_by_default(p) for p in params)
    if fused:
        if across_shards:
            raise ValueError(
                f"{who}: fused=True does not support sharded tensors (FSDP2, DeepSpeed ZeRO) with "
                f"the {policy.kind!r} selection yet; use fused=None or fused=False"
            )
        if not all(fused_available(p.device) for p in params):
            raise RuntimeError(f"{who}: {FUSED_HINT}")
    return bool(fused)


def _batches(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive index runs whose sizes add up to at most ``limit`` (a bigger item alone)."""
    batches: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if batches[-1] and total + size > limit:
            batches.append([])
            total = 0
        batches[-1].append(i)
        total += size
    return batches


def _shard_runs(shards: Sequence | None, n: int) -> list[tuple[list[int], list | None]]:
    """Index runs for the fused path: the unsharded tensors, then the shards of each process
    group (in order of first appearance, the same on every rank)."""
    if shards is None or all(s is None for s in shards):
        return [(list(range(n)), None)]
    runs: dict = {}
    for i, s in enumerate(shards):
        runs.setdefault(None if s is None else id(s.group), []).append(i)
    return [(idx, None if key is None else [shards[i] for i in idx]) for key, idx in runs.items()]


def masked_adamw(
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
    mask_weight_decay: bool = True,
    maximize: bool = False,
    tensor_indices: Sequence[int] | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    shards: Sequence | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """One masked AdamW step on lists of tensors, in place (docs/semantics.md).

    Moments and step counters advance for every tensor given; the parameter update lands on
    the entries ``policy`` selects. Every tensor shares ``policy`` and the hyperparameters.

    Args:
        params: parameters (plain tensors; the local shards of sharded ones).
        grads: their gradients, same shapes.
        exp_avgs, exp_avg_sqs: first and second moments, float32 (float64 for float64 params).
        state_steps: one-element float32 step counters, incremented here.
        policy: which entries move (:class:`maskopt.policy.SelectionPolicy`).
        lr, beta1, beta2, eps, weight_decay: AdamW's hyperparameters.
        mask_weight_decay: decay only the entries that move (default); False decays all.
        maximize: ascend instead of descend (the gradient is negated, as in torch's AdamW).
        tensor_indices: each tensor's index in its optimizer, keying the random masks
            (default ``0..len(params)-1``).
        grad_scale, found_inf: GradScaler's one-element tensors: gradients are divided by
            ``grad_scale``, and a nonzero ``found_inf`` makes the step change nothing.
        shards: per tensor, a ``maskopt.distributed.Shard`` for the local shard of a larger
            tensor (the selection is then exact over the whole tensor, on either path), or None.
        foreach: False steps one tensor at a time on the PyTorch path; None/True batch them.
        fused: True takes the Triton path, False the PyTorch path, None the Triton path when
            every tensor is a CUDA float32/bfloat16/float16 tensor and Triton is installed.
    """
    if not params:
        return
    if tensor_indices is None:
        tensor_indices = list(range(len(params)))
    sharded = shards is not None and any(s is not None for s in shards)
    fused = use_fused(fused, params, policy, sharded, shard_kernels=True)
    if maximize:
        grads = list(torch._foreach_neg(grads))
    hyper: dict[str, Any] = dict(
        policy=policy,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        mask_weight_decay=mask_weight_decay,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if fused:
        # whole tensors in one call, the shards of each process group in another: a call's
        # collectives run over one group, in the same order on every rank
        for run, run_shards in _shard_runs(shards, len(params)):
            _kernels().fused_adam_step_(
                *([x[i] for i in run] for x in lists),
                tensor_indices=[tensor_indices[i] for i in run],
                shards=run_shards,
                **hyper,
            )
        return
    if foreach is False:
        runs = [[i] for i in range(len(params))]
    elif sharded and not policy.moves_all:
        assert shards is not None  # sharded: some tensor has a Shard
        # Few, large batches: each batch's sharded selection makes its own collectives, which
        # cost far more than the cache misses that small batches save. They are cut by
        # whole-tensor sizes so that every rank makes the same calls; the limit bounds the
        # temporaries (score keys, gathered entries) to a few bytes per batch entry.
        runs = _batches(
            [s.numel if s is not None else p.numel() for p, s in zip(params, shards, strict=True)],
            _SHARDED_BATCH_ENTRIES,
        )
    else:
        runs = _batches([p.numel() for p in params], _BATCH_ENTRIES)
    for run in runs:
        masked_adam_(
            *([x[i] for i in run] for x in lists),
            tensor_indices=[tensor_indices[i] for i in run],
            shards=None if shards is None else [shards[i] for i in run],
            **hyper,
        )
