"""Triton kernels of maskopt (installed as ``maskopt.kernels``).

The fused hot path: multi-tensor masked Adam with exact per-tensor top-k (two passes over the
data: a histogram of |m| or |g| in a window around the previous threshold, then the update),
in-kernel RandomBCD masks and plain AdamW, for fp32, bf16 and fp16 parameters with fp32 or
bf16 moments, on whole tensors or FSDP2 shards. Importing this package never fails: without
Triton ``is_available`` returns False and ``fused_adam_step_`` raises a clear error. The
kernel modules are imported on first use, so ``TRITON_INTERPRET=1`` (CPU, CI) can be set any
time before the first fused step.

Layers: ``_common`` / ``_dense`` / ``_local`` / ``_window`` / ``_fallback`` / ``_apply`` /
``_resolve`` / ``_levels`` hold the ``@triton.jit`` kernels, ``plan`` builds the cached
plans, workspaces and device tables, ``launch`` checks the arguments and issues the launches,
and this module is the public API.
"""

from __future__ import annotations

import os

__all__ = ["fused_adam_step_", "is_available", "triton_available"]


def triton_available() -> bool:
    """True when Triton can be imported."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def is_available(device=None) -> bool:
    """Whether the fused path can run on ``device`` (a torch.device, str, or None for CUDA).

    True for CUDA devices when Triton is importable and CUDA is available, and for CPU only
    under the Triton interpreter (``TRITON_INTERPRET=1``), which is how CI tests the kernels.
    False for CUDA while ``TRITON_INTERPRET`` is set, for other device types, and whenever
    Triton cannot be imported.

    Args:
        device: the device the tensors to step live on: a ``torch.device`` or a string such
            as ``"cuda:0"`` or ``"cpu"``; None (default) means ``"cuda"``.
    """
    import torch

    if not triton_available():
        return False
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False"):
            return False
        return torch.cuda.is_available()
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
    return False


def fused_adam_step_(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs) -> None:
    """One fused masked-AdamW step of one parameter group, in place.

    The step counters and moments of every tensor advance; the parameter update lands on
    the entries ``policy`` selects (docs/semantics.md). The arguments are
    those of ``maskopt.kernels.launch.fused_adam_step_``, which checks them and raises
    ValueError/TypeError before anything changes. An empty ``params`` does nothing.

    Args:
        params: the parameters, float32, bfloat16 or float16, contiguous, all on one CUDA
            device (or the CPU under ``TRITON_INTERPRET=1``, see :func:`is_available`).
        grads: their dense gradients, same dtype and shape as each parameter.
        exp_avgs: first moments, float32 or bfloat16, shape of each parameter.
        exp_avg_sqs: second moments, the dtype of exp_avgs, shape of each parameter.
        state_steps: one-element float32 step counters on the parameters' device,
            incremented in place (they also key the random masks when ``policy.counter`` is
            None).
        **kwargs: keyword-only, all required:

            - ``policy``: the ``maskopt.policy.SelectionPolicy`` shared by all the tensors
              (kind, alpha, block_size, seed, counter).
            - ``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``: AdamW's
              hyperparameters (floats; decoupled weight decay).
            - ``mask_weight_decay``: True decays only the entries that move; False decays
              every entry.
            - ``tensor_indices``: each tensor's index in its optimizer, keying the random
              masks (read for the random kinds only; one per parameter).
            - ``grad_scale``: GradScaler's one-element scale tensor on the parameters'
              device (gradients are divided by it), or None.
            - ``found_inf``: GradScaler's one-element flag tensor on the parameters' device
              (nonzero: the step changes nothing, step counters included), or None.
            - ``shards`` (optional): per tensor a ``maskopt.distributed.Shard`` when every
              tensor is the local shard of a larger one over one process group (FSDP2); the
              selection is then exact over the whole tensors, with collectives between the
              launches (every rank of the group must make the same call).

    Raises:
        RuntimeError: Triton is not installed, or the device cannot run the kernels.
    """
    if not triton_available():
        raise RuntimeError("maskopt's fused path needs Triton (pip install triton), or use fused=False")
    from .launch import fused_adam_step_ as _impl

    _impl(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)
