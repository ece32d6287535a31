"""``MaskedAdam``: the one base class behind MoFO, RandomBCD and HalfAdam.

It owns argument checks, optimizer state, ``step()`` and dispatch between the Triton path
(``maskopt.kernels``) and the PyTorch path (``maskopt._functional``). A subclass only says,
per tensor, how the entries to update are selected (``_selection_of``).

State semantics (the same on every path):
- ``step``, ``exp_avg``, ``exp_avg_sq``: torch AdamW's keys. Moments are float32 whatever the
  parameter dtype, and are updated for *every* entry of a stepped tensor; only the parameter
  update is masked. A tensor that is skipped (no grad, or frozen by HalfAdam) keeps its state
  untouched, step counter included.
- An AdamW state dict loads into these optimizers and theirs into AdamW.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from . import distributed
from ._functional import masked_adam_
from .selection import ALL, TOPK_GRADIENT, TOPK_MOMENTUM

_FUSED_HINT = (
    "fused=True needs CUDA tensors and Triton installed (`pip install maskopt[triton]`); "
    "on CPU it runs only under TRITON_INTERPRET=1 (the Triton interpreter, for tests)"
)


# fused=None picks the Triton path on CUDA (DESIGN.md). This waited until the kernel tests
# had passed on a GPU (an H100, 2026-11-24: benchmarks/RESULTS.md), where the fused MoFO
# step also measured about 4x faster than the PyTorch path.
FUSED_BY_DEFAULT_ON_CUDA = True


# DeepSpeed ZeRO (stages 1-3) puts flat fp32 partitions of many tensors into the client
# optimizer's param_groups; accelerate does the same with FSDP1's flat parameters. A per-tensor
# selection would silently become a selection per partition, so a step refuses instead.
_REPLACED_PARAMS = (
    "{name}: the tensors in param_groups are not the ones the optimizer was built with. DeepSpeed "
    "ZeRO and FSDP1 (flat parameters, e.g. through accelerate) replace them with flat partitions "
    "of many tensors, where the per-tensor selection (top-k, masks) would silently change meaning. "
    "Not supported: use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP; with DeepSpeed, only "
    "ZeRO stage 0. To add parameters, use add_param_group()."
)


def _moment_dtype(param: torch.Tensor) -> torch.dtype:
    """float32 moments for fp32/bf16/fp16 parameters (DESIGN.md), float64 for float64 ones."""
    return torch.promote_types(param.dtype, torch.float32)


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fused_kernels():
    try:
        from maskopt import kernels
    except ImportError:  # pragma: no cover - kernels ship with the package
        return None
    return kernels if hasattr(kernels, "fused_adam_step_") else None


def fused_available(device: torch.device) -> bool:
    kernels = _fused_kernels()
    return kernels is not None and bool(kernels.is_available(device))


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: expected a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: expected a number, got {value!r}") from None


def check_range(name: str, value: Any, low: float, high: float, *, low_open=False, high_open=False) -> None:
    """Raise ValueError naming ``name`` unless ``low (<|<=) value (<|<=) high``."""
    x = _as_float(value, name)
    ok = not math.isnan(x)
    ok = ok and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        lo = f"{low} {'<' if low_open else '<='} " if low != -math.inf else ""
        hi = f" {'<' if high_open else '<='} {high}" if high != math.inf else ""
        raise ValueError(f"Invalid {name}: {value!r}; allowed: {lo}{name}{hi}")


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r}; allowed values: {', '.join(map(repr, allowed))}")


_BATCH_ENTRIES = 1 << 16


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


class MaskedAdam(Optimizer):
    """AdamW whose parameter update lands only on a selected set of entries.

    Subclasses implement :meth:`_selection_of`. Group keys shared by all: ``lr``, ``betas``,
    ``eps``, ``weight_decay``, ``mask_weight_decay``, ``foreach``, ``fused``.
    """

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        self._check_group(defaults)
        self._tensor_index: dict[torch.Tensor, int] | None = None
        self._registered: set[torch.Tensor] = set()
        super().__init__(params, defaults)
        if any(g.get("fused") for g in self.param_groups):
            for group in self.param_groups:
                for p in group["params"]:
                    if not fused_available(p.device):
                        raise RuntimeError(f"{type(self).__name__}: {_FUSED_HINT}; got a parameter on {p.device}")
        # GradScaler hands grad_scale/found_inf to a step that can take them (the fused path)
        # instead of unscaling the gradients itself; the PyTorch path honours them as well.
        params = [p for g in self.param_groups for p in g["params"]]
        self._step_supports_amp_scaling = bool(params) and all(
            g.get("fused") or (g.get("fused") is None and all(self._fused_by_default(p) for p in g["params"]))
            for g in self.param_groups
        )

    # -- arguments -------------------------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        """ValueError naming the argument for any out-of-range hyperparameter."""
        check_range("lr", group["lr"], 0.0, math.inf)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; allowed: a pair (beta1, beta2) with 0 <= beta < 1")
        check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0, math.inf)
        check_range("weight_decay", group["weight_decay"], 0.0, math.inf)
        if "mask_weight_decay" in group:
            check_choice("mask_weight_decay", group["mask_weight_decay"], (True, False))
        foreach, fused = group.get("foreach"), group.get("fused")
        check_choice("foreach", foreach, (None, True, False))
        check_choice("fused", fused, (None, True, False))
        if foreach and fused:
            raise ValueError("Invalid foreach/fused: foreach=True and fused=True cannot both be set")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
            self._check_group(merged)
        super().add_param_group(param_group)
        self._tensor_index = None
        self._registered.update(self.param_groups[-1]["params"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._tensor_index = None
        self._registered = {p for g in self.param_groups for p in g["params"]}
        # A state dict from torch.optim.AdamW lacks our keys: fill them from our defaults.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # -- selection (subclasses) ---------------------------------------------------------------

    def _selection_of(self, group: dict[str, Any], param: torch.Tensor, index: int):
        """``(kind, alpha, hash_counter)`` for this tensor, or None to leave it untouched.

        ``kind`` is one of maskopt.selection.KINDS; ``hash_counter`` replaces the step as the
        hash counter of the random kinds (None: use the step)."""
        raise NotImplementedError

    def _hash_seed(self, group: dict[str, Any]) -> int:
        return int(group.get("seed", 0))

    # -- state ---------------------------------------------------------------------------------

    def tensor_index(self, param: torch.Tensor) -> int:
        """Position of ``param`` among all the optimizer's parameters (group order); it keys
        the random masks, so it must not change across a resume."""
        if self._tensor_index is None:
            params = [p for g in self.param_groups for p in g["params"]]
            self._tensor_index = {p: i for i, p in enumerate(params)}
        return self._tensor_index[param]

    def _state_for(self, param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        moments = _moment_dtype(param)
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, dtype=moments, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=moments, memory_format=torch.preserve_format)
        else:
            if not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
            for key in ("exp_avg", "exp_avg_sq"):
                if state[key].dtype != moments:
                    state[key] = state[key].to(moments)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts loaded moments to the parameter dtype; ours stay float32, so keep the
        # saved tensors and restore them at full precision after the stock load.
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        saved = {
            pid: {k: v for k, v in state_dict["state"].get(pid, {}).items()
                  if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(v) and v.is_floating_point()}
            for pid in ids
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, param in zip(ids, params):
            for key, value in saved[pid].items():
                self.state[param][key] = value.to(device=param.device, dtype=_moment_dtype(param), copy=True)
        for group in self.param_groups:
            self._check_group(group)

    # -- step -----------------------------------------------------------------------------------

    def _fused_by_default(self, param: torch.Tensor) -> bool:
        return (FUSED_BY_DEFAULT_ON_CUDA and param.is_cuda and param.dtype in _FUSED_DTYPES
                and fused_available(param.device))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step; calls ``closure`` (with grad enabled) first if given, returns its loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Plan every group before touching anything, so a bad gradient raises with no
        # parameter or state changed.
        plans = []
        blocked: dict[int, list] = {}  # (local tensor, shard) selected per block, by block_size
        for group in self.param_groups:
            buckets: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
            for p in group["params"]:
                if p not in self._registered:
                    raise RuntimeError(_REPLACED_PARAMS.format(name=type(self).__name__))
                if p.grad is None:
                    continue
                index = self.tensor_index(p)
                selection = self._selection_of(group, p, index)
                if selection is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if torch.is_complex(p) or torch.is_complex(grad):
                    raise RuntimeError(f"{type(self).__name__} does not support complex parameters or gradients")
                if not p.is_floating_point():
                    raise RuntimeError(f"{type(self).__name__} needs floating-point parameters, got {p.dtype}")
                shard = distributed.shard_of(p, type(self).__name__)  # unsupported placements raise
                if shard is not None:
                    if selection[0] != ALL and group.get("fused"):
                        raise ValueError(
                            f"{type(self).__name__}: fused=True does not support sharded (FSDP2/DTensor) "
                            f"parameters with the {selection[0]!r} selection yet; use fused=None or fused=False"
                        )
                    if group.get("block_size") and selection[0] in (TOPK_MOMENTUM, TOPK_GRADIENT):
                        blocked.setdefault(group["block_size"], []).append((distributed.local(p), shard))
                bucket = buckets[selection]
                bucket["params"].append(p)
                bucket["grads"].append(grad)
                bucket["indices"].append(index)
                bucket["shards"].append(shard)
            plans.append((group, buckets))
        for block_size, sharded in sorted(blocked.items()):
            distributed.check_block_alignment(sharded, block_size, type(self).__name__)

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group, buckets in plans:
            for (kind, alpha, hash_counter), bucket in buckets.items():
                params = bucket["params"]
                states = [self._state_for(p) for p in params]
                self._run(
                    group, params, bucket["grads"], states,
                    selection=kind, alpha=alpha, hash_counter=hash_counter,
                    tensor_indices=bucket["indices"], shards=bucket["shards"], grad_scale=grad_scale,
                    found_inf=found_inf,
                )
        return loss

    def _run(self, group, params, grads, states, *, selection, alpha, hash_counter, tensor_indices,
             shards, grad_scale, found_inf) -> None:
        fused = group.get("fused")
        orig_params = params
        # batches are cut by whole-tensor sizes, so every rank of a sharded run makes the same calls
        numels = [p.numel() for p in params]
        if all(s is None for s in shards):
            shards = None
        elif selection != ALL:
            fused = False  # the sharded selection has no Triton version (fused=True refused in step())
        if any(distributed.is_dtensor(p) for p in params):
            # FSDP2 / DTensor: the math runs on the local shards; a selection that needs the
            # whole tensor (top-k, the hash's global indices) is computed across the shards.
            params = [distributed.local(p) for p in params]
            grads = [distributed.local(g) for g in grads]
            states = [dict(s, exp_avg=distributed.local(s["exp_avg"]), exp_avg_sq=distributed.local(s["exp_avg_sq"]))
                      for s in states]
        use_fused = all(self._fused_by_default(p) for p in params) if fused is None else fused
        if use_fused and not all(fused_available(p.device) for p in params):
            raise RuntimeError(f"{type(self).__name__}: {_FUSED_HINT}")
        beta1, beta2 = (_as_float(b, "betas") for b in group["betas"])
        hyper = dict(
            selection=selection, alpha=alpha, block_size=group.get("block_size"),
            lr=_as_float(group["lr"], "lr"), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], mask_weight_decay=group.get("mask_weight_decay", True),
            seed=self._hash_seed(group), hash_counter=hash_counter,
            grad_scale=grad_scale, found_inf=found_inf,
        )
        lists = (
            params, grads,
            [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
        )
        if use_fused:
            for s, p in zip(states, params):
                if s["step"].device != p.device:
                    s["step"] = s["step"].to(p.device)
            lists = lists[:4] + ([s["step"] for s in states],)
            if shards is not None:
                # the step counters moved to the device on the local copies of the state dicts
                for s_local, p_orig in zip(states, orig_params):
                    self.state[p_orig]["step"] = s_local["step"]
            _fused_kernels().fused_adam_step_(*lists, tensor_indices=tensor_indices, **hyper)
        elif group.get("foreach") is False:
            for i in range(len(params)):
                masked_adam_(*([x[i]] for x in lists), tensor_indices=[tensor_indices[i]],
                             shards=None if shards is None else [shards[i]], **hyper)
        else:
            # Tensors go through in batches of about _BATCH_ENTRIES entries: each batch still
            # takes foreach ops and a batched selection, and its m/v/p are still in cache
            # when the selection and the update read them again.
            for batch in _batches(numels, _BATCH_ENTRIES):
                masked_adam_(*([x[i] for i in batch] for x in lists),
                             tensor_indices=[tensor_indices[i] for i in batch],
                             shards=None if shards is None else [shards[i] for i in batch], **hyper)
