"""``MaskedAdam``: the one base class behind MoFO, RandomBCD and HalfAdam.

It owns argument checks, optimizer state and planning a step; the math runs in
:func:`maskopt.functional.masked_adamw`. A subclass only says, per tensor, which entries move
(:meth:`MaskedAdam.selection_policy`). The exact semantics are in docs/semantics.md:
- ``step``, ``exp_avg``, ``exp_avg_sq``: torch AdamW's keys. Moments are float32 whatever the
  parameter dtype (float64 for float64 parameters) and are updated for *every* entry of a
  stepped tensor; only the parameter update is masked. A tensor that is skipped (no grad, or
  frozen by HalfAdam) keeps its state untouched, step counter included.
- An AdamW state dict loads into these optimizers and theirs into AdamW.
- Every group value a step uses is checked before anything changes: at construction, in
  ``add_param_group``, in ``load_state_dict`` (on a copy) and at the start of ``step()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import distributed, zero
from ._checks import as_float as _as_float
from ._checks import check_choice, check_gradient, check_range, check_state
from ._graphs import stream_capturing
from .functional import (
    CAPTURE_HINT,
    FUSED_HINT,
    fused_available,
    fused_by_default,
    masked_adamw_routed,
    takes_fused,
)
from .policy import SelectionPolicy

# DeepSpeed ZeRO (stages 1-3) puts flat fp32 partitions of many tensors into the client
# optimizer's param_groups; maskopt.zero maps them back to the tensors. Anything else in their
# place (FSDP1's flat parameters, through accelerate) would turn the per-tensor selection into a
# selection per partition, so a step refuses it.
_REPLACED_PARAMS = (
    "{name}: the tensors in param_groups are not the ones the optimizer was built with, and they are "
    "not DeepSpeed ZeRO partitions of them (stages 1-3 are supported). FSDP1 (flat parameters, e.g. "
    "through accelerate) replaces them with flat partitions of many tensors, where the per-tensor "
    "selection (top-k, masks) would silently change meaning: not supported; use FSDP2 "
    "(torch.distributed.fsdp.fully_shard), DDP or DeepSpeed ZeRO. To add parameters, use add_param_group()."
)

# torch's Optimizer adds this key to `defaults` when it unpickles or loads a state dict; it
# is not one of our hyperparameters (steps never build an autograd graph), so it must not be
# copied into the groups.
_TORCH_ONLY_DEFAULTS = ("differentiable",)


MOMENT_DTYPES = (None, torch.float32, torch.bfloat16)


def moment_dtype(param: torch.Tensor, group: dict[str, Any] | None = None) -> torch.dtype:
    """The dtype of ``param``'s moments: the group's ``moment_dtype`` when it is set, else
    float32 for fp32/bf16/fp16 parameters and float64 for float64 ones.

    Args:
        param: a floating-point parameter.
        group: its param group (None: the default for its dtype).
    """
    chosen = None if group is None else group.get("moment_dtype")
    return chosen if chosen is not None else torch.promote_types(param.dtype, torch.float32)


# -- argument checks ----------------------------------------------------------------------------


def _check_adamw_keys(group: dict[str, Any]) -> None:
    """Keys of torch.optim.AdamW/Adam groups (an AdamW state dict brings them along): the ones
    whose value would change the math are supported (maximize) or refused, never ignored.
    ``capturable`` changes no result, and torch.compile sets it on an optimizer it traces,
    so it is left alone."""
    if group.get("amsgrad", False) is not False:
        raise ValueError(
            f"Invalid amsgrad: {group['amsgrad']!r}; allowed values: False "
            "(maskopt's optimizers have no AMSGrad variant)"
        )
    if group.get("differentiable", False) is not False:
        raise ValueError(
            f"Invalid differentiable: {group['differentiable']!r}; allowed values: False "
            "(a maskopt step is not differentiable)"
        )
    if group.get("decoupled_weight_decay", True) is not True and _as_float(
        group.get("weight_decay", 0), "weight_decay"
    ):
        raise ValueError(
            "Invalid decoupled_weight_decay: False with weight_decay != 0; allowed values: True "
            "(maskopt's weight decay is AdamW's decoupled decay, not Adam's L2 penalty)"
        )


def check_adamw_keywords(*, amsgrad: Any, capturable: Any, differentiable: Any) -> None:
    """torch.optim.AdamW's keywords, which a drop-in replacement takes: refused where maskopt
    cannot do what they ask (``amsgrad=True``, ``differentiable=True``), accepted otherwise.

    Args:
        amsgrad: must be False (no AMSGrad variant).
        capturable: True or False; changes nothing (see docs/semantics.md).
        differentiable: must be False (a maskopt step is not differentiable).
    """
    check_choice("capturable", capturable, (True, False))
    _check_adamw_keys({"amsgrad": amsgrad, "differentiable": differentiable})


def plain_values(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with NumPy scalars (also inside tuples and lists, such as ``betas``) turned into
    the Python numbers they hold, so a state dict loads with ``torch.load(weights_only=True)``.

    Args:
        group: a param group or defaults dict; ``"params"`` is left as it is.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (tuple, list)):
            return type(value)(plain(v) for v in value)
        return value

    return {k: (v if k == "params" else plain(v)) for k, v in group.items()}


# -- a planned step ------------------------------------------------------------------------------


@dataclass
class _Bucket:
    """Tensors of one group that share a selection policy and a path (``fused``: the Triton
    kernels, else the PyTorch path), checked and ready to step."""

    group: dict[str, Any]
    policy: SelectionPolicy
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    shards: list[Any] = field(default_factory=list)
    fused: bool = True


class MaskedAdam(Optimizer):
    """AdamW whose parameter update lands only on a selected set of entries.

    Subclasses implement :meth:`selection_policy` (and extend :meth:`_check_group`). Group
    keys shared by all: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``mask_weight_decay``,
    ``maximize``, ``foreach``, ``fused``.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        defaults: the default value of every group key (the subclass's arguments).
    """

    def __init__(
        self,
        params,
        defaults: dict[str, Any],
        *,
        amsgrad: Any = False,
        capturable: Any = False,
        differentiable: Any = False,
    ) -> None:
        check_adamw_keywords(amsgrad=amsgrad, capturable=capturable, differentiable=differentiable)
        defaults = plain_values(defaults)
        self._check_group(defaults)
        self._tensor_index: dict[torch.Tensor, int] | None = None
        # Each group with the tensors it was built with: DeepSpeed ZeRO swaps a group's
        # "params" for flat partitions in place, and the selection is still per built tensor.
        self._built_groups: list[tuple[dict[str, Any], list[torch.Tensor]]] = []
        super().__init__(params, defaults)
        self._install_load_hooks()
        if any(g.get("fused") for g in self.param_groups):
            for group in self.param_groups:
                for p in group["params"]:
                    if not fused_available(p.device):
                        raise RuntimeError(
                            f"{type(self).__name__}: {FUSED_HINT}; got a parameter on {p.device}"
                        )
        # GradScaler hands grad_scale/found_inf to a step that can take them (the fused path)
        # instead of unscaling the gradients itself; the PyTorch path honours them as well.
        params = [p for g in self.param_groups for p in g["params"]]
        self._step_supports_amp_scaling = bool(params) and all(
            g.get("fused") or (g.get("fused") is None and all(fused_by_default(p) for p in g["params"]))
            for g in self.param_groups
        )

    # -- arguments -------------------------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        """ValueError naming the argument for any value of ``group`` that a step would use
        and that is out of range or of the wrong type. Subclasses extend it."""
        check_range("lr", group["lr"], 0.0, math.inf)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; allowed: a pair (beta1, beta2) with 0 <= beta < 1")
        check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0, math.inf)
        check_range("weight_decay", group["weight_decay"], 0.0, math.inf)
        for key in ("mask_weight_decay", "maximize"):
            if key in group:
                check_choice(key, group[key], (True, False))
        check_choice("moment_dtype", group.get("moment_dtype"), MOMENT_DTYPES)
        foreach, fused = group.get("foreach"), group.get("fused")
        check_choice("foreach", foreach, (None, True, False))
        check_choice("fused", fused, (None, True, False))
        if foreach and fused:
            raise ValueError("Invalid foreach/fused: foreach=True and fused=True cannot both be set")
        _check_adamw_keys(group)

    def _check_groups(self, groups: Sequence[dict[str, Any]]) -> None:
        """Check every group, and what must agree between groups (subclasses extend it)."""
        for group in groups:
            self._check_group(group)

    def _check_live_groups(self) -> None:
        """What must hold of the live ``param_groups`` beyond their values (subclasses): checked
        at the start of ``step()`` and of ``state_dict()``."""

    def _with_defaults(self, group: dict[str, Any]) -> dict[str, Any]:
        """``group``'s hyperparameters with the missing ones taken from the defaults."""
        filled = {k: v for k, v in self.defaults.items() if k not in _TORCH_ONLY_DEFAULTS}
        filled.update((k, v) for k, v in group.items() if k != "params")
        return filled

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            param_group = plain_values(param_group)
            self._check_groups([*getattr(self, "param_groups", []), self._with_defaults(param_group)])
        super().add_param_group(param_group)
        self._tensor_index = None
        self._built_groups.append((self.param_groups[-1], list(self.param_groups[-1]["params"])))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict comes here with new group dicts in the old ones' order; under DeepSpeed
        # ZeRO their "params" are flat partitions, so the built tensors carry over by position.
        old_groups = self.__dict__.get("param_groups")
        built = (
            [self._built_params(g) for g in old_groups]
            if old_groups and "_built_groups" in self.__dict__
            else None
        )
        super().__setstate__(state)
        if built is None or len(built) != len(self.param_groups):
            built = [list(g["params"]) for g in self.param_groups]
        self._built_groups = list(zip(self.param_groups, built, strict=True))
        self._tensor_index = None
        if "_check_hook" not in self.__dict__:  # a copy or an unpickled optimizer
            self._install_load_hooks()
        # A state dict from torch.optim.AdamW lacks our keys: fill them from our defaults.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key not in _TORCH_ONLY_DEFAULTS:
                    group.setdefault(key, value)

    # -- selection (subclasses) ---------------------------------------------------------------

    def selection_policy(
        self, param: torch.Tensor, group: dict[str, Any] | None = None
    ) -> SelectionPolicy | None:
        """Which entries of ``param`` move in this step (None: the tensor is left untouched).

        Args:
            param: one of the optimizer's parameters.
            group: its param group (found when not given).
        """
        if group is None:
            group = next(
                (g for g in self.param_groups if any(p is param for p in self._built_params(g))), None
            )
            if group is None:
                raise ValueError(self._foreign(param, "selection_policy"))
        return self._policy(group, param)

    def _foreign(self, param: Any, method: str) -> str:
        what = f"a tensor of shape {tuple(param.shape)}" if torch.is_tensor(param) else repr(param)
        return f"{type(self).__name__}.{method}: {what} is not one of this optimizer's parameters"

    def _policy(self, group: dict[str, Any], param: torch.Tensor) -> SelectionPolicy | None:
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------

    def _built_params(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The tensors ``group`` was built with (or given through ``add_param_group``): its
        ``"params"``, unless DeepSpeed ZeRO has put flat partitions in their place.

        Args:
            group: one of the optimizer's param groups.
        """
        return next((params for g, params in self._built_groups if g is group), group["params"])

    def _param_list(self) -> list[torch.Tensor]:
        """Every built tensor, in group order (what ``param_groups`` held before any ZeRO swap)."""
        return [p for _, params in self._built_groups for p in params]

    def tensor_index(self, param: torch.Tensor) -> int:
        """Position of ``param`` among all the optimizer's parameters (group order); it keys
        the random masks, so it must not change across a resume.

        Args:
            param: one of the optimizer's parameters.
        """
        index = self._index_of_built().get(param) if torch.is_tensor(param) else None
        if index is None:
            raise ValueError(self._foreign(param, "tensor_index"))
        return index

    def _index_of_built(self) -> dict[torch.Tensor, int]:
        """``{built tensor: its tensor_index}``, rebuilt after the groups change."""
        if self._tensor_index is None:
            self._tensor_index = {p: i for i, p in enumerate(self._param_list())}
        return self._tensor_index

    def _state_for(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[param]
        moments = moment_dtype(param, group)
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

    def _check_state_dict(self, state_dict: dict[str, Any]) -> Any:
        """Refuse a state dict whose groups or moments this optimizer could not step with,
        before anything is installed; returns what :meth:`_after_load` needs (subclasses).

        Args:
            state_dict: the dict being loaded, as the pre-hooks left it.
        """
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            found = len(groups) if isinstance(groups, list) else groups
            raise ValueError(
                f"Invalid state_dict: it has {found} param groups, the optimizer has {len(self.param_groups)}"
            )
        for i, (saved, own) in enumerate(zip(groups, self.param_groups, strict=True)):
            if len(saved.get("params", ())) != len(own["params"]):
                raise ValueError(
                    f"Invalid state_dict: param group {i} has {len(saved.get('params', ()))} parameters, "
                    f"the optimizer's has {len(own['params'])}"
                )
        self._check_groups([self._with_defaults(g) for g in groups])
        params = [p for group in self.param_groups for p in group["params"]]
        ids = [pid for group in groups for pid in group["params"]]
        for pid, param in zip(ids, params, strict=True):
            for key, value in state_dict["state"].get(pid, {}).items():
                if key in ("exp_avg", "exp_avg_sq") and torch.is_tensor(value):
                    shapes = {tuple(param.shape), tuple(distributed.local(param).shape)}
                    if tuple(value.shape) not in shapes:
                        raise ValueError(
                            f"Invalid state_dict: state[{pid!r}][{key!r}] has shape "
                            f"{tuple(value.shape)}, its parameter has {tuple(param.shape)}"
                        )
        return None

    def _after_load(self, checked: Any) -> None:
        """What a subclass does once a state dict is installed (before the user's post-hooks).

        Args:
            checked: what :meth:`_check_state_dict` returned for that dict.
        """

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with the group values as plain Python numbers (a NumPy scalar
        set in ``param_groups`` would stop it loading with ``torch.load(weights_only=True)``)."""
        self._check_live_groups()
        out = super().state_dict()
        out["param_groups"] = [plain_values(g) for g in out["param_groups"]]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (this optimizer's, or torch.optim.AdamW's, MoFO's, ...).

        As in torch, the load-state-dict pre-hooks run first and may return an adapted dict;
        that dict is then checked (a refused one installs nothing) and installed, and the
        post-hooks run last and see (and may replace) what was loaded. Moments keep their own
        dtype (torch would cast them to the parameter's). ``fused`` and ``foreach`` say how this
        process steps, not what was trained: the optimizer keeps its own.

        Args:
            state_dict: as returned by ``state_dict()``.
        """
        super().load_state_dict(state_dict)

    # Our check runs after every other pre-hook and our install before every other post-hook,
    # where torch's own processing runs: a pre-hook adapts a checkpoint before it is checked, a
    # post-hook sees what was loaded.

    def _install_load_hooks(self) -> None:
        self._loading: dict[str, Any] | None = None
        self._check_hook = super().register_load_state_dict_pre_hook(MaskedAdam._check_loading)
        self._install_hook = super().register_load_state_dict_post_hook(
            MaskedAdam._finish_loading, prepend=True
        )

    def register_load_state_dict_pre_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        handle = super().register_load_state_dict_pre_hook(hook, prepend)
        self._optimizer_load_state_dict_pre_hooks.move_to_end(self._check_hook.id)
        return handle

    def register_load_state_dict_post_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        handle = super().register_load_state_dict_post_hook(hook, prepend)
        self._optimizer_load_state_dict_post_hooks.move_to_end(self._install_hook.id, last=False)
        return handle

    @staticmethod
    def _check_loading(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        assert isinstance(optimizer, MaskedAdam)
        optimizer._loading = None
        checked = optimizer._check_state_dict(state_dict)
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        # torch casts loaded moments to the parameter dtype; ours keep theirs, so hold on to the
        # tensors of the dict as the pre-hooks left it and install them after the stock load
        moments = [
            {
                k: v
                for k, v in state_dict["state"].get(pid, {}).items()
                if k in ("exp_avg", "exp_avg_sq", "step") and torch.is_tensor(v) and v.is_floating_point()
            }
            for pid in ids
        ]
        own = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
        optimizer._loading = dict(checked=checked, moments=moments, own=own)

    @staticmethod
    def _finish_loading(optimizer: Optimizer) -> None:
        assert isinstance(optimizer, MaskedAdam)
        loading, optimizer._loading = optimizer._loading, None
        if loading is None:
            return
        for group, own in zip(optimizer.param_groups, loading["own"], strict=True):
            group.update(own)
        params = [(p, group) for group in optimizer.param_groups for p in group["params"]]
        for saved, (param, group) in zip(loading["moments"], params, strict=True):
            for key, value in saved.items():
                # copies: a state dict taken from a live optimizer shares no tensor with it
                if key == "step":
                    optimizer.state[param][key] = value.clone()
                else:
                    optimizer.state[param][key] = value.to(
                        device=param.device, dtype=moment_dtype(param, group), copy=True
                    )
        optimizer._after_load(loading["checked"])

    # -- step -----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step; calls ``closure`` (with grad enabled) first if given, returns its loss.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every check runs before the first tensor changes: a refused step changes nothing.
        self._check_groups(self.param_groups)
        self._check_live_groups()
        buckets = self._plan_step()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for bucket in buckets:
            if isinstance(bucket, _Bucket):
                self._run(bucket, grad_scale, found_inf)
            else:  # the tensors of DeepSpeed ZeRO partitions (maskopt.zero)
                bucket.run(grad_scale, found_inf)
        return loss

    def _plan_step(self) -> list:
        """Group the tensors to step by (group, policy, path), checking everything that could
        fail, in every group, before the first tensor changes: gradients, placements, and per
        tensor whether the Triton kernels can take it (device, dtype and layout of the
        parameter, its gradient and its state). ``fused=None`` sends a tensor they cannot take
        to the PyTorch path, the rest of its group keeping the Triton path; ``fused=True``
        refuses it."""
        name = type(self).__name__
        capturing = stream_capturing()
        buckets: list = []
        blocked: dict[int, list] = {}  # (local tensor, shard) selected per block, by block_size
        for group in self.param_groups:
            if any(p not in self._index_of_built() for p in group["params"]):
                zero_step = zero.plan_partitions(self, group, adamw_options(group))
                if zero_step is None:
                    raise RuntimeError(_REPLACED_PARAMS.format(name=name))
                buckets.append(zero_step)
                continue
            by_path: dict[tuple[SelectionPolicy, bool], _Bucket] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                policy = self._policy(group, p)
                if policy is None:
                    continue
                index = self.tensor_index(p)
                state = self.state.get(p) or {}
                check_gradient(name, f"parameter {index}", p, p.grad, state.get("exp_avg"))
                local = distributed.local(p)
                local_state = {k: distributed.local(v) if torch.is_tensor(v) else v for k, v in state.items()}
                check_state(name, f"parameter {index}", local, local_state)  # its moments are tensors now
                shard = distributed.shard_of(p, name)  # unsupported placements raise
                if shard is not None and policy.block_size and policy.is_topk:
                    blocked.setdefault(policy.block_size, []).append((local, shard))
                fused = takes_fused(
                    group.get("fused"),
                    local,
                    distributed.local(p.grad),
                    local_state.get("exp_avg"),
                    local_state.get("exp_avg_sq"),
                    policy=policy,
                    sharded=shard is not None,
                    who=name,
                    what=f"parameter {index}",
                    moment_dtype=moment_dtype(p, group),  # _state_for converts the moments to it
                )
                if not fused and local.device.type == "meta" and not policy.moves_all:
                    raise ValueError(
                        f"{name}: parameter {index} is on the meta device, which holds no values; the "
                        f"{policy.kind!r} selection reads them (AdamW steps there: alpha=1 or ratio=1)"
                    )
                step = state.get("step")
                if (
                    fused
                    and capturing
                    and not (
                        torch.is_tensor(step) and step.device == local.device and step.dtype == torch.float32
                    )
                ):
                    raise RuntimeError(
                        f"{name}: a CUDA graph is being captured and parameter {index} has no "
                        f"optimizer state on its device yet (its first fused step); {CAPTURE_HINT}"
                    )
                bucket = by_path.setdefault((policy, fused), _Bucket(group, policy, fused=fused))
                bucket.params.append(p)
                bucket.grads.append(p.grad)
                bucket.indices.append(index)
                bucket.shards.append(shard)
            buckets += by_path.values()
        for block_size, sharded in sorted(blocked.items()):
            distributed.check_block_alignment(sharded, block_size, name)
        return buckets

    def _run(self, bucket: _Bucket, grad_scale, found_inf) -> None:
        group, params = bucket.group, bucket.params
        states = [self._state_for(p, bucket.group) for p in params]
        shards = bucket.shards if any(s is not None for s in bucket.shards) else None
        grads = bucket.grads
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        if any(distributed.is_dtensor(p) for p in params):
            # FSDP2 / DTensor: the math runs on the local shards; a selection that needs the
            # whole tensor (top-k, the hash's global indices) is computed across the shards.
            params, grads, exp_avgs, exp_avg_sqs = (
                [distributed.local(x) for x in xs] for xs in (params, grads, exp_avgs, exp_avg_sqs)
            )
        if bucket.fused:
            # the kernels keep the step counters on the device, in float32
            for s, p in zip(states, params, strict=True):
                if s["step"].device != p.device or s["step"].dtype != torch.float32:
                    s["step"] = s["step"].to(device=p.device, dtype=torch.float32)
        masked_adamw_routed(  # _plan_step checked and routed every tensor
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [s["step"] for s in states],
            [bucket.fused] * len(params),
            cpu_step=group.get("fused") is None and group.get("foreach") is None,
            policy=bucket.policy,
            tensor_indices=bucket.indices,
            grad_scale=grad_scale,
            found_inf=found_inf,
            shards=shards,
            **adamw_options(group),
        )


def adamw_options(group: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`maskopt.functional.masked_adamw` that come from a
    (checked) param group: ``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``,
    ``mask_weight_decay``, ``maximize`` and ``foreach``.

    Args:
        group: a param group whose values ``_check_group`` accepted.
    """
    beta1, beta2 = (_as_float(b, "betas") for b in group["betas"])
    return dict(
        lr=_as_float(group["lr"], "lr"),
        beta1=beta1,
        beta2=beta2,
        eps=_as_float(group["eps"], "eps"),
        weight_decay=_as_float(group["weight_decay"], "weight_decay"),
        mask_weight_decay=group.get("mask_weight_decay", True),
        maximize=group.get("maximize", False),
        foreach=group.get("foreach"),
    )
