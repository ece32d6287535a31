"""Telemetry for partial-update optimizers: how much of each tensor a step updated, and how
far the weights are from where they started.

``UpdateTelemetry(optimizer)`` hooks ``optimizer.register_step_post_hook`` and records, after
every step and for every parameter tensor, how many entries that step updated:

- a tensor with no gradient, or frozen (HalfAdam), counts 0;
- AdamW-like steps (HalfAdam's active tensors, ``alpha=1``, any non-maskopt optimizer such
  as ``torch.optim.AdamW``): every entry of a tensor with a gradient;
- MoFO (either filter) and ``RandomBCD(exact=True)``: ``topk_count`` per tensor, or per
  ``block_size`` block; known on the host from the shapes, so free;
- ``RandomBCD`` and ``HalfAdam(strategy="parameter")``: the size of the hash mask. The mask
  is a pure function of (seed, tensor index, counter, entry), so the hook only notes the
  counter; the count is computed on the parameter's device when it is read.
- ``mask_weight_decay=False`` with weight decay: every entry (each one is decayed).

"Updated" means written by the step; in bf16/fp16 an update can round to the old value.

Nothing in the step hook reads a device value: host-known counts are Python ints, and the
rest stay device tensors until you ask for numbers (``as_dict(sync=True)`` / ``to_floats``),
which costs one device-to-host transfer per device.

``track_distance=True`` additionally keeps a copy of the parameters as θ0 (the parameters'
size again, on ``reference_device``) and gives, when asked, ‖θ − θ0‖₂ per tensor and over
the whole model, and the fraction of entries with θ ≠ θ0.

``maskopt.hf_callback.UpdateTelemetryCallback`` adds these numbers to the Hugging Face
Trainer's logs.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import _hash
from .optimizer import MaskedAdam
from .selection import RANDOM

__all__ = ["UpdateTelemetry", "to_floats", "unwrap_optimizer"]

# Random counts and distances work through at most this many entries at a time (bounds the
# temporary memory: 4 bytes per entry for hash keys, 4-8 for an fp32/fp64 difference).
_CHUNK = 1 << 24


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside wrappers that keep it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, ...).

    Args:
        optimizer: a torch optimizer, a wrapper of one (nested wrappers are followed), or any
            object.

    Returns:
        The innermost ``torch.optim.Optimizer`` reached through ``.optimizer`` attributes, or
        ``optimizer`` itself when its ``.optimizer`` is missing or not a torch optimizer.
    """
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


# -- counts ---------------------------------------------------------------------------------


class _HashMask:
    """One tensor's RandomBCD-style selection this step; its size is computed when read."""

    __slots__ = ("alpha", "counter", "device", "index", "numel", "seed")

    def __init__(self, numel, alpha, seed, index, counter, device):
        self.numel, self.alpha, self.seed, self.index = numel, alpha, seed, index
        self.counter = counter  # a Python int, or a 0-d tensor snapshot of a device step counter
        self.device = device

    def count(self) -> torch.Tensor | int:
        limit = _hash.signed_threshold(self.alpha)
        if self.numel == 0:
            return 0
        if limit >= 1 << 31:  # alpha == 1: every entry
            return self.numel
        key: torch.Tensor | int
        if torch.is_tensor(self.counter):
            key = _hash.stream_key_tensor(self.seed, self.index, self.counter)
        else:
            key = _hash.stream_key(self.seed, self.index, self.counter)
        total = None
        for start in range(0, self.numel, _CHUNK):
            length = min(_CHUNK, self.numel - start)
            if torch.is_tensor(key):
                keys = _hash._order_keys_torch(length, key, key.device, start)
            else:
                keys = _hash.order_keys(length, key, self.device, start)
            part = torch.count_nonzero(keys < limit)
            total = part if total is None else total + part
        assert total is not None  # numel > 0: the loop ran
        return total


# -- reading values -------------------------------------------------------------------------


def _sum(values: Iterable[Any]) -> Any:
    """Sum of Python numbers and 0-d tensors; a tensor (on the first tensor's device) if any."""
    host, tensors = 0, []
    for v in values:
        if torch.is_tensor(v):
            tensors.append(v)
        else:
            host += v
    if not tensors:
        return host
    device = tensors[0].device
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    stacked = torch.stack([t.reshape(()).to(device=device, dtype=dtype, non_blocking=True) for t in tensors])
    return stacked.sum() + host


def to_floats(values: Mapping[Any, Any]) -> dict[Any, float]:
    """The same dict with every value a Python float: one device-to-host copy per device.

    Args:
        values: a mapping whose values are Python numbers or one-element tensors (on any
            device; a DTensor counts with its global value). Keys are kept, in order.

    Returns:
        A new dict with the same keys, every value converted with ``float``.
    """
    out: dict[Any, float] = {}
    by_device: dict[torch.device, list[tuple[Any, torch.Tensor]]] = {}
    for key, v in values.items():
        if torch.is_tensor(v):
            if hasattr(v, "full_tensor"):  # a DTensor: its global value
                v = v.full_tensor()
            by_device.setdefault(v.device, []).append((key, v))
        else:
            out[key] = float(v)
    for items in by_device.values():
        floats = torch.stack([v.detach().reshape(()).to(torch.float64) for _, v in items]).tolist()
        out.update({key: f for (key, _), f in zip(items, floats, strict=True)})
    return {key: out[key] for key in values}  # keep the caller's order


# -- the telemetry --------------------------------------------------------------------------


class UpdateTelemetry:
    """Per-step update counts (and, opt-in, distance from the start) of an optimizer's tensors.

    Constructing it registers a step pre-hook and post-hook on the optimizer. Use
    :meth:`remove` (or a ``with`` block) to unhook; it also frees the copy.

    Args:
        optimizer: a maskopt optimizer (MoFO, RandomBCD, HalfAdam, any ``MaskedAdam``) or any
            torch optimizer that updates every entry of a tensor with a gradient (AdamW,
            Adam, SGD); wrappers with ``.optimizer`` (accelerate's ``AcceleratedOptimizer``)
            are unwrapped.
        named_parameters: ``model.named_parameters()`` (or the model) to key the results by
            name. Without it (None, the default) the names stored in the param groups
            (``param_names``, present when the optimizer was built from named parameters)
            are used, else the tensor's position (an int) among the optimizer's parameters.
            Tensors it does not name, and every tensor when two share a name, are keyed by
            position.
        track_distance: keep a copy of the parameters, taken now, as θ0 for :meth:`distance`
            and :meth:`changed_fraction` (default False). It costs the parameters' size in
            memory on ``reference_device``. :meth:`reset_reference` re-takes it (e.g. at the
            start of a new task), and turns tracking on if it was off. Keyword-only.
        reference_device: where θ0 is kept: None (default) keeps each parameter's copy on its
            own device; ``"cpu"`` keeps it off the GPU, in pinned memory, and each read then
            copies it to the GPU chunk by chunk. Keyword-only.

    Raises:
        TypeError: ``optimizer`` is not (and does not wrap) a ``torch.optim.Optimizer``.
        ValueError: ``named_parameters`` names none of the optimizer's tensors, or
            ``reference_device`` is not a device.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | torch.nn.Module | None = None,
        *,
        track_distance: bool = False,
        reference_device: torch.device | str | None = None,
    ) -> None:
        self.optimizer = unwrap_optimizer(optimizer)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"UpdateTelemetry needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(named_parameters, torch.nn.Module):
            named_parameters = named_parameters.named_parameters()
        self._given_names = None if named_parameters is None else {p: n for n, p in named_parameters}
        if self._given_names is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if params and not any(p in self._given_names for p in params):
                raise ValueError(
                    "named_parameters: none of these tensors is in the optimizer's param_groups; pass "
                    "model.named_parameters() of the model the optimizer was built for (or None)"
                )
        self.track_distance = bool(track_distance)
        try:
            self.reference_device = None if reference_device is None else torch.device(reference_device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"Invalid reference_device: {reference_device!r}; allowed: None (each "
                f"parameter's own device) or a torch device such as 'cpu' ({err})"
            ) from None
        self.steps = 0  # optimizer steps recorded so far
        self._records: list[Any] | None = None  # the last step, as recorded by the hook
        self._keep: torch.Tensor | None = None  # GradScaler's "step not skipped", when it was passed
        self._counts: list[Any] | None = None  # the last step's counts, once read
        self._params: list[torch.Tensor] = []
        self._reference: list[torch.Tensor] | None = None
        self._refresh()
        if self.track_distance:
            self.reset_reference()
        self._handles = [
            self.optimizer.register_step_pre_hook(self._before_step),
            self.optimizer.register_step_post_hook(self._after_step),
        ]

    # -- parameters and names ----------------------------------------------------------------

    def _refresh(self) -> None:
        """Follow parameter groups added after construction (their θ0 is taken now)."""
        groups = self.optimizer.param_groups
        if sum(len(g["params"]) for g in groups) == len(self._params):
            return
        params = [p for g in groups for p in g["params"]]
        group_names = [n for g in groups for n in g.get("param_names", ())]
        names: list[Any] = []
        for i, p in enumerate(params):
            if self._given_names is not None and p in self._given_names:
                names.append(self._given_names[p])
            elif self._given_names is None and len(group_names) == len(params):
                names.append(group_names[i])
            else:
                names.append(i)
        if len(set(names)) != len(names):  # the same name twice: fall back to positions
            names = list(range(len(params)))
        old = len(self._params)
        self._params, self.names = params, names
        self.numel = {n: p.numel() for n, p in zip(names, params, strict=True)}
        self._records = self._counts = None
        if self._reference is not None:
            self._reference += [self._snapshot(p) for p in params[old:]]

    def _before_step(self, optimizer, args, kwargs) -> None:
        self._refresh()

    # -- the step hook -----------------------------------------------------------------------

    def _after_step(self, optimizer, args, kwargs) -> None:
        """Record what this step selected. Reads no device value (no host-device sync)."""
        opt = self.optimizer
        masked = isinstance(opt, MaskedAdam)
        records: list[Any] = []
        device_counters: dict[torch.device, list[tuple[_HashMask, torch.Tensor]]] = {}
        for group in opt.param_groups:
            decays_all = (
                masked and group.get("mask_weight_decay", True) is False and group.get("weight_decay", 0) != 0
            )
            for p in group["params"]:
                n = p.numel()
                if p.grad is None:
                    records.append(0)
                    continue
                if not masked:
                    records.append(n)
                    continue
                index = opt.tensor_index(p)
                policy = opt.selection_policy(p, group)
                if policy is None:
                    records.append(0)
                    continue
                count = n if decays_all else policy.count(n)
                if count is not None:
                    records.append(count)
                elif policy.kind == RANDOM:
                    counter = policy.counter
                    mask = _HashMask(n, policy.alpha, policy.seed, index, None, p.device)
                    if counter is None:
                        step = opt.state[p]["step"]
                        if torch.is_tensor(step) and step.device.type != "cpu":
                            device_counters.setdefault(step.device, []).append((mask, step))
                        else:
                            counter = int(step)  # a CPU tensor or a number: no device sync
                    mask.counter = counter
                    records.append(mask)
                else:
                    warnings.warn(
                        f"UpdateTelemetry: unknown selection kind {policy.kind!r}; counted as unknown",
                        stacklevel=2,
                    )
                    records.append(None)
        # Device step counters (the fused path) move on in place each step: one stacked
        # copy per device keeps this step's values.
        for masks_steps in device_counters.values():
            snapshot = torch.stack([s.detach().reshape(()) for _, s in masks_steps])
            for i, (mask, _) in enumerate(masks_steps):
                mask.counter = snapshot[i]
        # GradScaler hands found_inf to steps that take it (fused ones) and the step then
        # changes nothing; on other optimizers it skips step() and this hook altogether.
        found_inf = getattr(opt, "found_inf", None)
        self._keep = found_inf.detach().eq(0) if torch.is_tensor(found_inf) else None
        self._records, self._counts = records, None
        self.steps += 1

    # -- update counts -----------------------------------------------------------------------

    def _last_counts(self) -> list[Any] | None:
        if self._records is None:
            return None
        if self._counts is None:
            counts = [r.count() if isinstance(r, _HashMask) else r for r in self._records]
            if self._keep is not None:
                keep = self._keep
                counts = [
                    None
                    if c is None
                    else keep.to(torch.int64) * (c.to(keep.device) if torch.is_tensor(c) else c)
                    for c in counts
                ]
            self._counts = counts
        return self._counts

    def updated_counts(self) -> dict[Any, int | torch.Tensor]:
        """Entries each tensor's last step updated: ``{name: int or 0-d device tensor}``
        (empty before the first step). Only RandomBCD-style tensors are computed (on device)."""
        counts = self._last_counts()
        if counts is None:
            return {}
        return {n: c for n, c in zip(self.names, counts, strict=True) if c is not None}

    def updated_fraction(self) -> dict[Any, float | torch.Tensor]:
        """``updated_counts()`` divided by each tensor's size (empty tensors left out)."""
        return {n: c / self.numel[n] for n, c in self.updated_counts().items() if self.numel[n]}

    # -- distance from the start -------------------------------------------------------------

    def _snapshot(self, p: torch.Tensor) -> torch.Tensor:
        src = p.detach()
        if self.reference_device is None or self.reference_device == src.device:
            return src.clone()
        ref = src.to(self.reference_device, copy=True)
        if ref.device.type == "cpu" and src.device.type == "cuda":
            ref = ref.pin_memory()  # so that reads copy it back to the GPU asynchronously
        return ref

    @torch.no_grad()
    def reset_reference(self) -> None:
        """Take the current parameters as θ0 (turns distance tracking on). Copies them all once."""
        self._refresh()
        self.track_distance = True
        self._reference = None  # free the old copy before taking the new one
        self._reference = [self._snapshot(p) for p in self._params]

    @torch.no_grad()
    def _distance_terms(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per tensor, ‖θ − θ0‖² and the count of entries with θ ≠ θ0, as device tensors."""
        if self._reference is None:
            raise RuntimeError("distance needs track_distance=True (or reset_reference()): θ0 was not kept")
        self._refresh()
        squares, changed = [], []
        for p, ref in zip(self._params, self._reference, strict=True):
            theta = p.detach()
            acc = torch.float64 if theta.dtype == torch.float64 else torch.float32
            if type(theta) is not torch.Tensor or theta.numel() <= _CHUNK:  # a whole-tensor pass
                pairs = [(theta, ref)]  # (tensor subclasses such as DTensor take this path)
            else:
                flat, flat_ref = theta.reshape(-1), ref.reshape(-1)
                pairs = [
                    (flat[s : s + _CHUNK], flat_ref[s : s + _CHUNK]) for s in range(0, flat.numel(), _CHUNK)
                ]
            sq = moved = None
            for a, b in pairs:
                if b.device != a.device:
                    b = b.to(a.device, non_blocking=True)
                part_sq = torch.linalg.vector_norm(a.to(acc) - b.to(acc)).square()
                part_moved = torch.count_nonzero(a != b)
                sq = part_sq if sq is None else sq + part_sq
                moved = part_moved if moved is None else moved + part_moved
            if sq is None or moved is None:  # an empty tensor (no pairs: both None)
                sq = torch.zeros((), dtype=acc, device=theta.device)
                moved = torch.zeros((), dtype=torch.int64, device=theta.device)
            squares.append(sq)
            changed.append(moved)
        return squares, changed

    def distance(self) -> dict[Any, torch.Tensor]:
        """‖θ − θ0‖₂ per tensor (0-d device tensors; computed now, one pass over θ and θ0)."""
        squares, _ = self._distance_terms()
        return {n: sq.sqrt() for n, sq in zip(self.names, squares, strict=True)}

    def changed_fraction(self) -> dict[Any, torch.Tensor]:
        """Share of each tensor's entries with θ ≠ θ0 (0-d device tensors; empty tensors left out).

        Equals "entries that ever moved" unless an entry came back to exactly its start."""
        _, changed = self._distance_terms()
        return {n: c / self.numel[n] for n, c in zip(self.names, changed, strict=True) if self.numel[n]}

    # -- summaries ---------------------------------------------------------------------------

    def summary(self, per_tensor: bool = False, distance: bool = True) -> dict[str, Any]:
        """All numbers at once, as Python numbers or 0-d device tensors (no sync):

        - ``updated_fraction_mean``: mean over tensors of the share of entries the last step updated;
        - ``updated_fraction_total``: entries updated / all entries, last step;
        - ``updated_entries``: entries updated, last step;
        - with distance tracking (and ``distance=True``): ``distance``, ‖θ − θ0‖₂ over all
          tensors, and ``changed_fraction``, the share of all entries with θ ≠ θ0;
        - ``per_tensor=True`` adds ``updated_fraction/<name>``, ``distance/<name>`` and
          ``changed_fraction/<name>``.

        The ``updated_*`` keys are absent before the first step; tensors of an unknown
        selection kind are left out of them, and empty tensors out of the fractions.

        Args:
            per_tensor: also give each tensor's values, keyed ``<key>/<name>`` (default False).
            distance: include the distance keys when θ0 is kept (default True); False skips
                the pass over the parameters and θ0 that computes them.
        """
        out: dict[str, Any] = {}
        total_numel = sum(self.numel.values())
        counts = self.updated_counts()
        if counts:
            fractions = {n: c / self.numel[n] for n, c in counts.items() if self.numel[n]}
            if fractions:
                out["updated_fraction_mean"] = _sum(fractions.values()) / len(fractions)
            counted = sum(self.numel[n] for n in counts)
            if counted:
                out["updated_fraction_total"] = _sum(counts.values()) / counted
            out["updated_entries"] = _sum(counts.values())
            if per_tensor:
                out.update({f"updated_fraction/{n}": f for n, f in fractions.items()})
        if distance and self._reference is not None:
            squares, changed = self._distance_terms()
            out["distance"] = _sum(squares).sqrt() if squares else 0.0
            if total_numel:
                out["changed_fraction"] = _sum(changed) / total_numel
            if per_tensor:
                out.update({f"distance/{n}": sq.sqrt() for n, sq in zip(self.names, squares, strict=True)})
                out.update(
                    {
                        f"changed_fraction/{n}": c / self.numel[n]
                        for n, c in zip(self.names, changed, strict=True)
                        if self.numel[n]
                    }
                )
        return out

    def as_dict(
        self, sync: bool = True, per_tensor: bool = False, distance: bool = True, prefix: str = ""
    ) -> dict[str, Any]:
        """:meth:`summary` with ``prefix`` on every key; ``sync=True`` makes every value a
        Python float (one device-to-host copy per device), ``sync=False`` leaves tensors.

        Args:
            sync: True (default) converts every value to a Python float (waits for the
                device); False returns Python numbers and 0-d device tensors as they are.
            per_tensor: also give each tensor's values (default False), as :meth:`summary`.
            distance: include the distance keys when θ0 is kept (default True), as
                :meth:`summary`.
            prefix: prepended to every key (default ``""``; the Trainer callback uses
                ``"maskopt/"``).
        """
        values = {prefix + k: v for k, v in self.summary(per_tensor=per_tensor, distance=distance).items()}
        return to_floats(values) if sync else values

    # -- lifetime ----------------------------------------------------------------------------

    @property
    def removed(self) -> bool:
        return not self._handles

    def remove(self) -> None:
        """Unhook from the optimizer and free θ0. The last step's counts stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._reference = None

    def __enter__(self) -> UpdateTelemetry:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"UpdateTelemetry({type(self.optimizer).__name__}, tensors={len(self._params)}, "
            f"steps={self.steps}, track_distance={self._reference is not None})"
        )
