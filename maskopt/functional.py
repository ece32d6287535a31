"""The functional form of the masked AdamW step, in the spirit of ``torch.optim``'s functional
AdamW: lists of tensors in, updated in place, no optimizer object.

:func:`masked_adamw` picks the path, tensor by tensor: the Triton kernels
(``maskopt.kernels``, CUDA, one call per device) or the PyTorch path (``maskopt.pytorch_path``,
any device). The optimizer classes keep the state, check the arguments and plan the step (the
same per-tensor choice, for every group before anything changes), then call this.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .policy import SelectionPolicy
from .pytorch_path import masked_adam_

__all__ = ["masked_adamw", "fused_available", "fused_refusal", "takes_fused", "use_fused"]

# fused=None takes the PyTorch path on CUDA too: the current kernels have passed their tests
# only under the Triton interpreter, and no GPU has run them yet. A GPU schedules programs and
# generates float code in ways the interpreter cannot show (docs/kernels.md), so the default
# waits for benchmarks/gpu_session.sh to pass on hardware; that run flips this constant.
FUSED_BY_DEFAULT_ON_CUDA = False
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUSED_MOMENT_DTYPES = (torch.float32, torch.bfloat16)

FUSED_HINT = (
    "fused=True needs NVIDIA CUDA tensors (ROCm/HIP is not tested yet) and Triton installed "
    "(`pip install maskopt[triton]`); on CPU it runs only under TRITON_INTERPRET=1 (the Triton "
    "interpreter, for tests)"
)

_ACROSS_SHARDS = (
    "{who}: fused=True does not support sharded tensors (FSDP2, DeepSpeed ZeRO) with the {kind!r} "
    "selection yet; use fused=None or fused=False"
)

CAPTURE_HINT = (
    "keep the gradients at fixed addresses (zero_grad(set_to_none=False), or copy new gradients "
    "into .grad) and run one eager step with the same tensors before capturing"
)

# Tensors go through the PyTorch path in batches of about this many entries: each batch
# still takes foreach ops and a batched selection, and its m/v/p are still in cache when the
# selection and the update read them again.
_BATCH_ENTRIES = 1 << 16
_SHARDED_BATCH_ENTRIES = 1 << 26


_AVAILABLE: dict[tuple[torch.device, str | None], bool] = {}


def _kernels():
    try:
        from maskopt import kernels
    except ImportError:  # pragma: no cover - kernels ship with the package
        return None
    return kernels if hasattr(kernels, "fused_adam_step_") else None


def _is_rocm(device: torch.device) -> bool:
    return device.type == "cuda" and torch.version.hip is not None


def fused_available(device: torch.device) -> bool:
    """Whether the Triton path can run on ``device``. False on ROCm/HIP, where Triton builds
    the kernels but they have never been tested (wavefronts of 64, other float code).

    Args:
        device: a torch device (CUDA; CPU only under ``TRITON_INTERPRET=1``).
    """
    if _is_rocm(device):
        return False
    # Asked for every tensor of every step: remembered per device and interpreter setting
    # (which the kernels read at each call, and tests change).
    key = (device, os.environ.get("TRITON_INTERPRET"))
    known = _AVAILABLE.get(key)
    if known is None:
        kernels = _kernels()
        known = _AVAILABLE[key] = kernels is not None and bool(kernels.is_available(device))
    return known


def _device_refusal(device: torch.device) -> str | None:
    if _is_rocm(device):
        return f"it is on {device}, a ROCm/HIP device, where the kernels have not been tested yet"
    if not fused_available(device):
        return f"it is on {device}, where the Triton path does not run ({FUSED_HINT})"
    return None


def _layout(x: torch.Tensor) -> str:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return f"strides {tuple(x.stride())} for shape {tuple(x.shape)}: a transposed, sliced or expanded view"


def fused_refusal(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None = None,
    exp_avg_sq: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    *,
    moment_dtype: torch.dtype | None = None,
) -> str | None:
    """Why the Triton kernels cannot step this tensor, or None when they can: its device (no
    Triton path there, or ROCm/HIP), a dtype they do not take (float64), a layout they cannot
    read (anything but contiguous row-major: channels_last, transposed, sliced), tensors on
    another device or of another shape than the parameter.

    Args:
        param: a (local) parameter.
        grad: its gradient.
        exp_avg, exp_avg_sq: its moments as the step will read them; None: not created yet
            (they will be created with the parameter's layout).
        step: its step counter as the kernels will get it; None: not checked (the optimizer
            moves it to the parameter's device as float32 itself).
        moment_dtype: the dtype the moments will have when the step runs (the optimizer
            converts them first); None: their own dtype.
    """
    return _device_refusal(param.device) or _tensor_refusal(
        param, grad, exp_avg, exp_avg_sq, step, moment_dtype
    )


def _tensor_refusal(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor | None,
    step: torch.Tensor | None,
    moment_dtype: torch.dtype | None,
) -> str | None:
    """:func:`fused_refusal` but for the device."""
    if param.dtype not in FUSED_DTYPES:
        return f"it is {param.dtype}; the kernels take float32, bfloat16 and float16 parameters"
    if grad.layout != torch.strided:
        return "its gradient is sparse; the kernels take dense gradients"
    if grad.dtype != param.dtype:
        return f"its gradient is {grad.dtype}, the parameter {param.dtype}; the kernels need the same dtype"
    moments = [m for m in (exp_avg, exp_avg_sq) if m is not None]
    dtypes = {moment_dtype} if moment_dtype is not None else {m.dtype for m in moments}
    if len(dtypes) > 1 or not dtypes <= set(FUSED_MOMENT_DTYPES):
        names = ", ".join(str(d) for d in sorted(dtypes, key=str))
        return f"its moments are {names}; the kernels take float32 or bfloat16 moments, both of one dtype"
    for what, x in (
        ("the parameter", param),
        ("its gradient", grad),
        ("its exp_avg", exp_avg),
        ("its exp_avg_sq", exp_avg_sq),
    ):
        if x is None:
            continue
        if x.device != param.device:
            return f"{what} is on {x.device}, the parameter on {param.device}"
        if x.shape != param.shape:
            return f"{what} has shape {tuple(x.shape)}, the parameter {tuple(param.shape)}"
        if not x.is_contiguous():
            return f"{what} is not contiguous ({_layout(x)}); the kernels read dense row-major tensors"
    if step is not None and (step.numel() != 1 or step.dtype != torch.float32 or step.device != param.device):
        return (
            f"its step counter is a {step.dtype} tensor of {step.numel()} elements on {step.device}; "
            "the kernels take a one-element float32 tensor on the parameter's device"
        )
    return None


def fused_by_default(param: torch.Tensor) -> bool:
    """Whether ``fused=None`` may take the Triton path for ``param`` (its gradient and state
    must suit the kernels as well: :func:`fused_refusal`). False while
    ``FUSED_BY_DEFAULT_ON_CUDA`` is False.

    Args:
        param: a (local) parameter tensor.
    """
    return (
        FUSED_BY_DEFAULT_ON_CUDA
        and param.is_cuda
        and param.dtype in FUSED_DTYPES
        and fused_available(param.device)
    )


def takes_fused(
    fused: bool | None,
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None = None,
    exp_avg_sq: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    *,
    policy: SelectionPolicy,
    sharded: bool,
    who: str,
    what: str,
    moment_dtype: torch.dtype | None = None,
    shard_kernels: bool = True,
) -> bool:
    """Whether one tensor takes the Triton path: per tensor, so that under ``fused=None`` a
    tensor the kernels cannot take (:func:`fused_refusal`) goes to the PyTorch path while the
    rest of its group keeps the Triton path, and ``fused=True`` refuses it. Changes nothing.

    Args:
        fused: the ``fused`` option: True (required), False (the PyTorch path) or None (the
            Triton path where :func:`fused_by_default` and the kernels allow it).
        param, grad, exp_avg, exp_avg_sq, step, moment_dtype: as for :func:`fused_refusal`.
        policy: its selection policy.
        sharded: whether it is the shard of a larger tensor (FSDP2, ZeRO).
        who: the name errors start with.
        what: how errors name the tensor (e.g. ``"parameter 3"``).
        shard_kernels: as for :func:`use_fused`.

    Raises:
        RuntimeError: ``fused=True`` on a device where the Triton path cannot run.
        ValueError: ``fused=True`` for a tensor the kernels cannot take (dtype, layout), or a
            selection across shards the Triton path cannot handle.
    """
    if fused is False:
        return False
    across_shards = sharded and not policy.moves_all and not shard_kernels
    if fused is None:
        if across_shards or not fused_by_default(param):
            return False
    else:
        if across_shards:
            raise ValueError(_ACROSS_SHARDS.format(who=who, kind=policy.kind))
        reason = _device_refusal(param.device)
        if reason is not None:
            raise RuntimeError(f"{who}: fused=True cannot step {what}: {reason}")
    reason = _tensor_refusal(param, grad, exp_avg, exp_avg_sq, step, moment_dtype)
    if reason is None:
        return True
    if fused:
        raise ValueError(
            f"{who}: fused=True cannot step {what}: {reason}; use fused=None (the PyTorch path for "
            "such tensors, the Triton path for the others) or fused=False"
        )
    return False


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
            raise ValueError(_ACROSS_SHARDS.format(who=who, kind=policy.kind))
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


def _fused_runs(
    indices: Sequence[int], params: Sequence[torch.Tensor], shards: Sequence | None
) -> list[tuple[list[int], list | None]]:
    """Index runs for the Triton path, one ``fused_adam_step_`` call each: per device (its own
    launches and workspaces, no traffic between devices), the unsharded tensors apart from the
    shards of each process group (a call's collectives run over one group). In order of first
    appearance, which is the same on every rank."""
    runs: dict[tuple, list[int]] = {}
    for i in indices:
        shard = None if shards is None else shards[i]
        runs.setdefault((params[i].device, None if shard is None else id(shard.group)), []).append(i)
    return [
        (idx, None if group is None or shards is None else [shards[i] for i in idx])
        for (_, group), idx in runs.items()
    ]


def _on_device(
    x: torch.Tensor | None, device: torch.device, copies: dict[torch.device, torch.Tensor]
) -> torch.Tensor | None:
    """GradScaler's one-element tensor on ``device`` (one copy per device and step, on the
    stream: no host synchronisation)."""
    if x is None or x.device == device:
        return x
    if device not in copies:
        copies[device] = x.to(device, non_blocking=True)
    return copies[device]


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
    cpu_step: bool | None = None,
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
        foreach: False steps one tensor at a time on the PyTorch path; True takes the PyTorch
            path's foreach ops; None (default) lets ``fused`` choose.
        fused: True takes the Triton path for every tensor, False the PyTorch path; None
            (default) the best path tensor by tensor: the Triton path where
            :func:`fused_by_default` allows it and the kernels can take the tensor (CUDA,
            float32/bfloat16/float16, contiguous; :func:`fused_refusal`), the compiled CPU
            step for float32 CPU tensors (``maskopt.cpu_step``, with ``foreach=None``), the
            PyTorch path for the rest.
        cpu_step: whether float32 CPU tensors take the compiled CPU step where it is built;
            None (default): ``fused is None and foreach is None``.

    Raises:
        ValueError: lists of different lengths; ``fused=True`` with a tensor the kernels
            cannot take (the message names its index and the reason).
        RuntimeError: ``fused=True`` on a device where the Triton path cannot run.

    Every check runs before any tensor changes. The Triton path steps each device's tensors
    with their own launches.
    """
    if not params:
        return
    if tensor_indices is None:
        tensor_indices = list(range(len(params)))
    n = len(params)
    for name, given in (
        ("grads", grads),
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("state_steps", state_steps),
        ("tensor_indices", tensor_indices),
        ("shards", shards),
    ):
        if given is not None and len(given) != n:
            raise ValueError(f"masked_adamw: len({name})={len(given)}; it must equal len(params)={n}")
    # Per tensor. A sharded tensor is routed alike on every rank (FSDP2 keeps each rank's
    # shard contiguous, of the same dtype), so every rank makes the same collectives.
    on_fused = [
        takes_fused(
            fused,
            params[i],
            grads[i],
            exp_avgs[i],
            exp_avg_sqs[i],
            state_steps[i],
            policy=policy,
            sharded=shards is not None and shards[i] is not None,
            who="masked_adamw",
            what=f"tensor {i}",
        )
        for i in range(n)
    ]
    masked_adamw_routed(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        on_fused,
        cpu_step=fused is None and foreach is None if cpu_step is None else cpu_step,
        policy=policy,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        mask_weight_decay=mask_weight_decay,
        maximize=maximize,
        tensor_indices=tensor_indices,
        grad_scale=grad_scale,
        found_inf=found_inf,
        shards=shards,
        foreach=foreach,
    )


def masked_adamw_routed(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    on_fused: Sequence[bool],
    *,
    cpu_step: bool,
    policy: SelectionPolicy,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    mask_weight_decay: bool,
    maximize: bool,
    tensor_indices: Sequence[int],
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    shards: Sequence | None,
    foreach: bool | None,
) -> None:
    """:func:`masked_adamw` once every tensor is checked and routed (the optimizer routes them
    while it plans a step, so a step checks each tensor once).

    Args:
        params, grads, exp_avgs, exp_avg_sqs, state_steps: as for :func:`masked_adamw`, of one
            length.
        on_fused: per tensor, whether it takes the Triton path (:func:`takes_fused` said so).
        cpu_step: whether the others take the compiled CPU step where it can take them
            (:func:`maskopt.cpu_step.takes_cpu_step`).
        policy, lr, beta1, beta2, eps, weight_decay, mask_weight_decay, maximize,
            tensor_indices, grad_scale, found_inf, shards, foreach: as for :func:`masked_adamw`
            (``tensor_indices`` given).
    """
    n = len(params)
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
    )
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    fused_indices = [i for i in range(n) if on_fused[i]]
    if fused_indices:
        kernels = _kernels()
        assert kernels is not None  # takes_fused checked fused_available
        scales: dict[torch.device, torch.Tensor] = {}
        infs: dict[torch.device, torch.Tensor] = {}
        for run, run_shards in _fused_runs(fused_indices, params, shards):
            device = params[run[0]].device
            kernels.fused_adam_step_(
                *([x[i] for i in run] for x in lists),
                tensor_indices=[tensor_indices[i] for i in run],
                shards=run_shards,
                grad_scale=_on_device(grad_scale, device, scales),
                found_inf=_on_device(found_inf, device, infs),
                **hyper,
            )
    rest = [i for i in range(n) if not on_fused[i]]
    if not rest:
        return

    def step_on_host(step_fn, run: list[int]) -> None:  # the PyTorch path or the compiled CPU step
        step_fn(
            *([x[i] for i in run] for x in lists),
            tensor_indices=[tensor_indices[i] for i in run],
            shards=None if shards is None else [shards[i] for i in run],
            grad_scale=grad_scale,
            found_inf=found_inf,
            **hyper,
        )

    across_shards = shards is not None and not policy.moves_all and any(shards[i] is not None for i in rest)
    compiled: set[int] = set()
    if cpu_step:
        from . import cpu_step as compiled_step

        compiled = {
            i
            for i in rest
            if compiled_step.takes_cpu_step(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i])
        }
        if compiled and not across_shards:  # one call: it spreads the tensors over the threads
            step_on_host(compiled_step.masked_adam_cpu_, sorted(compiled))
            rest = [i for i in rest if i not in compiled]
            if not rest:
                return
    if foreach is False:
        runs = [[i] for i in rest]
    elif across_shards:
        assert shards is not None  # across_shards says so
        # Few, large batches: each batch's sharded selection makes its own collectives, which
        # cost far more than the cache misses that small batches save. They are cut by
        # whole-tensor sizes so that every rank makes the same calls; the limit bounds the
        # temporaries (score keys, gathered entries) to a few bytes per batch entry.
        sizes = [shards[i].numel if shards[i] is not None else params[i].numel() for i in rest]
        runs = [[rest[j] for j in batch] for batch in _batches(sizes, _SHARDED_BATCH_ENTRIES)]
    else:
        sizes = [params[i].numel() for i in rest]
        runs = [[rest[j] for j in batch] for batch in _batches(sizes, _BATCH_ENTRIES)]
    for run in runs:
        # A run of sharded tensors is cut alike on every rank, and every rank routes it alike,
        # so the selection's collectives match whichever path steps it.
        step_run = masked_adam_
        if compiled and all(i in compiled for i in run):
            step_run = compiled_step.masked_adam_cpu_
        step_on_host(step_run, run)
