"""HalfAdam: Half Fine-Tuning (HFT) as an optimizer -- AdamW on a fixed half per training round."""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from . import hft
from .hft import checks
from .optimizer import MaskedAdam
from .policy import SelectionPolicy, cached_policy
from .selection import ALL, RANDOM

# Keys that describe the round's selection: one value for the whole optimizer.
_ROUND_KEYS = ("ratio", "strategy", "seed", "freeze", "round")
# The state-dict key recording which tensors the saved round trained (see load_state_dict).
DIGEST_KEY = "selection_digest"
# How many tensors the round's selection was drawn over, then after each add_param_group of
# the round: the draw for the first n tensors decides them, a later draw only the tensors it
# added, so a group added mid-round leaves every earlier tensor's selection as it was.
SIZES_KEY = "round_sizes"

_WHOLE = "whole"
_ENTRIES = "entries"
# Set on a tensor while a HalfAdam holds it frozen, so that a tensor with requires_grad=False
# can be told apart from one the user froze (which HalfAdam never unfreezes).
_FROZEN_MARK = "_maskopt_frozen_by_half"


def _user_frozen(p: torch.Tensor) -> bool:
    return not p.requires_grad and not getattr(p, _FROZEN_MARK, False)


def _digest(params: list[torch.Tensor], mode: dict[torch.Tensor, str]) -> str:
    """A short fingerprint of which tensors (by position) train and how."""
    text = ";".join(f"{i}:{mode[p]}" for i, p in enumerate(params) if p in mode)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class HalfAdam(MaskedAdam):
    r"""AdamW on a ``ratio`` share of the model, reselected per training round (HFT, Algorithm 1).

    In round :math:`r` a set :math:`T_r` of tensors is trained with the plain AdamW step and
    every other tensor is frozen (no update, no optimizer state). Pass
    ``model.named_parameters()`` so that :math:`T_r` is chosen per transformer layer and
    category (attention / feed-forward / norm) by :func:`maskopt.hft.plan_half`; embeddings,
    lm_head and everything outside the layer stack stay trainable. Without names it falls back
    to a random ``ratio`` share of the tensors (and warns). :meth:`new_round` draws the next
    half from ``(seed, round)`` and resets the optimizer state, as a new fine-tuning stage does.
    A tensor the user had frozen (``requires_grad=False``) stays frozen and out of the plan.
    How the half is chosen: docs/hft.md; the step's semantics: docs/semantics.md.

    Args:
        params: ``model.named_parameters()`` (for HFT's selection), an iterable of tensors, or
            param-group dicts (with ``"params"`` as ``(name, tensor)`` pairs for names).
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2)``, each in [0, 1) (default (0.9, 0.999)).
        eps: term added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay of the trained tensors (default 0.0).
        ratio: share of each category's units that trains, ``0 < ratio <= 1`` (default 0.5).
        strategy: ``"category"`` (default; the paper), ``"layer"``, ``"model"`` or
            ``"parameter"`` (see :func:`maskopt.hft.plan_half`).
        seed: integer >= 0; the half is a pure function of (names, sizes, seed, round, options).
        freeze: ``"requires_grad"`` (default) sets ``requires_grad=False`` on the frozen half so
            autograd skips their weight gradients (HFT's time saving); ``"mask"`` leaves
            ``requires_grad`` alone and just does not step them (for DDP).
        foreach: None (default): the best path (below); True: foreach ops on the PyTorch path;
            False: the PyTorch path one tensor at a time.
        fused: None (default): float32 CPU tensors take the compiled CPU step
            (``maskopt.cpu_step``, built on first use; the PyTorch path with one warning where
            no C++ compiler is found), the rest the PyTorch path, on CUDA too until a GPU has
            run the current Triton kernels (docs/performance.md); True: the Triton path on
            CUDA, a tensor it cannot take (float64, a non-contiguous layout) refused before any
            change; False: the PyTorch path.
        classify: planner hook for units the built-in rules do not know: a callable
            ``(unit_path, module_or_None) -> category | None`` or a dict ``{regex: category}``.
        layers: the layer stack prefix(es), e.g. ``"model.layers"``, overriding detection.
        freeze_non_layer: also freeze embeddings, lm_head and other non-layer tensors
            (default False, as in the paper).
        balance: ``"count"`` (default; the paper) or ``"numel"`` (balance parameter counts).
        round: the round to start in (default 0). torch.distributed.checkpoint creates state
            before it loads, so a resumed HalfAdam must already hold the saved round.
        maximize: maximize the objective instead of minimising it (default False).
        moment_dtype: the dtype ``exp_avg`` and ``exp_avg_sq`` are stored in: None (default)
            keeps float32 moments for float32/bfloat16/float16 parameters (float64 for
            float64 ones); ``torch.bfloat16`` halves the optimizer state, as torch's fused
            AdamW does for bfloat16 parameters (the moments are computed in float32 and
            rounded to nearest as they are stored; the selection reads the stored values);
            ``torch.float32`` forces float32.
        amsgrad, capturable, differentiable: ``torch.optim.AdamW``'s keywords, taken so the swap
            is one line: ``amsgrad`` and ``differentiable`` must be False (a ``ValueError``
            otherwise: there is no AMSGrad variant, and a step is not differentiable);
            ``capturable`` may be True or False and changes nothing (docs/semantics.md).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        ratio: float = 0.5,
        strategy: str = "category",
        seed: int = 0,
        freeze: str = "requires_grad",
        foreach: bool | None = None,
        fused: bool | None = None,
        *,
        classify=None,
        layers=None,
        freeze_non_layer: bool = False,
        balance: str = "count",
        round: int = 0,  # noqa: A002 - the param-group key of the same name
        maximize: bool = False,
        moment_dtype: torch.dtype | None = None,
        amsgrad: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        # Planner options live on the optimizer, not in param_groups: a callable `classify`
        # would stop the state dict from loading with torch.load(weights_only=True).
        self._plan_options = hft.check_plan_options(
            classify=classify, layers=layers, freeze_non_layer=freeze_non_layer, balance=balance
        )
        self._built = False
        self._mode: dict[torch.Tensor, str] = {}
        self._round_settings: dict[str, Any] = {}
        self._kept_frozen: set[torch.Tensor] = set()
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            ratio=ratio,
            strategy=strategy,
            seed=seed,
            freeze=freeze,
            round=round,
            foreach=foreach,
            fused=fused,
            maximize=maximize,
            moment_dtype=moment_dtype,
        )
        super().__init__(
            params, defaults, amsgrad=amsgrad, capturable=capturable, differentiable=differentiable
        )
        self.plan = None
        self._round_sizes: list[int] = []
        drawn = self._draw_round(self.param_groups[0], [len(self._param_list())])
        self._built = True
        self._install(*drawn)

    # -- arguments ---------------------------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        checks.check_ratio(group["ratio"])
        checks.check_strategy(group["strategy"])
        checks.check_freeze(group["freeze"])
        checks.check_seed(group["seed"])
        checks.check_round(group["round"])

    def _check_groups(self, groups) -> None:
        super()._check_groups(groups)
        for group in groups[1:]:
            for key in _ROUND_KEYS:
                if group[key] != groups[0][key]:
                    raise ValueError(
                        f"Invalid {key}: {group[key]!r}; HalfAdam selects one half for the whole model, so "
                        f"every param group must use {key}={groups[0][key]!r}"
                    )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and getattr(self, "param_groups", None):
            # a group added later joins the current round: the round's settings it does not
            # give are the round's, not the constructor's (round 1 after a new_round())
            current = {key: self.param_groups[0][key] for key in _ROUND_KEYS if key not in param_group}
            param_group = {**param_group, **current}
        super().add_param_group(param_group)
        self._kept_frozen.update(p for p in self.param_groups[-1]["params"] if _user_frozen(p))
        if getattr(self, "_built", False):  # joins the current round; the others keep theirs
            sizes = [*self._round_sizes, len(self._param_list())]
            self._install(*self._draw_round(self.param_groups[0], sizes))

    # -- copies ------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        params = self._param_list()
        state["_plan_options"] = self._plan_options
        state["_kept_frozen_at"] = [i for i, p in enumerate(params) if p in self._kept_frozen]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        options = state.pop("_plan_options", None)
        kept_at = state.pop("_kept_frozen_at", None)
        super().__setstate__(state)
        if options is not None:  # a copy or an unpickled object, not a load_state_dict
            params = self._param_list()
            self._plan_options = options
            self._kept_frozen = {params[i] for i in kept_at}
            self._built = True
            sizes = self.param_groups[0].get(SIZES_KEY) or [len(params)]
            self._install(*self._draw_round(self.param_groups[0], sizes))

    # -- rounds -------------------------------------------------------------------------------

    @property
    def round(self) -> int:
        """The current training round (0 for the first)."""
        return int(self.param_groups[0]["round"])

    def new_round(self) -> None:
        """Start the next training stage: a new half from (seed, round + 1), fresh optimizer state."""
        for group in self.param_groups:
            group["round"] += 1
        self.state.clear()
        self._select_current_round()

    def is_trainable(self, param: torch.Tensor) -> bool:
        """Whether ``param`` (or some of its entries) is trained in the current round.

        Args:
            param: one of the optimizer's parameters.
        """
        if not torch.is_tensor(param) or param not in self._index_of_built():
            raise ValueError(self._foreign(param, "is_trainable"))
        return param in self._mode

    def _check_state_dict(self, state_dict: dict[str, Any]) -> Any:
        """Also refuse a state dict saved by a HalfAdam that trained other tensors in that round;
        returns the round's selection, installed by :meth:`_after_load`.

        Args:
            state_dict: the dict being loaded, as the pre-hooks left it.
        """
        super()._check_state_dict(state_dict)
        saved = self._with_defaults(state_dict["param_groups"][0])
        mode, plan, sizes = self._draw_round(saved, self._checked_sizes(saved.get(SIZES_KEY)))
        recorded = state_dict["param_groups"][0].get(DIGEST_KEY)
        expected = _digest(self._param_list(), mode)
        if recorded is not None and recorded != expected:
            raise ValueError(
                f"HalfAdam.load_state_dict: the saved optimizer trained a different set of tensors in round "
                f"{saved['round']} than this one would ({DIGEST_KEY} {recorded!r} != {expected!r}). "
                "Build the optimizer as the saving run did: the same parameters in the same order, with names "
                "(model.named_parameters()) or without them as there, the same planner options (classify, layers, "
                "freeze_non_layer, balance) and the same tensors frozen by hand."
            )
        return mode, plan, sizes

    def _after_load(self, checked: Any) -> None:
        self._install(*checked)
        # a frozen tensor has no state (a MoFO or AdamW state dict has state for every tensor)
        for p in self._param_list():
            if p not in self._mode:
                self.state.pop(p, None)

    def _select_current_round(self) -> None:
        """Draw and install the selection of the round the param groups hold, over every tensor."""
        self._install(*self._draw_round(self.param_groups[0], [len(self._param_list())]))

    def _checked_sizes(self, sizes: Any) -> list[int]:
        """A state dict's ``round_sizes`` (absent: one draw over every tensor), checked."""
        n = len(self._param_list())
        if sizes is None:
            return [n]
        ok = isinstance(sizes, (list, tuple)) and len(sizes) > 0 and sizes[-1] == n
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in sizes)
        ok = ok and all(a < b for a, b in itertools.pairwise(sizes))
        if not ok:
            raise ValueError(
                f"Invalid state_dict: {SIZES_KEY} is {sizes!r}; allowed: increasing tensor counts "
                f"ending with this optimizer's {n} tensors"
            )
        return list(sizes)

    def _draw_round(
        self, settings: Mapping[str, Any], sizes: list[int]
    ) -> tuple[dict[torch.Tensor, str], Any, list[int]]:
        """The round's selection when its draw covered the first ``sizes[0]`` tensors and each
        later add_param_group the tensors up to the next size; changes nothing."""
        params = self._param_list()
        mode: dict[torch.Tensor, str] = {}
        plan = None
        start = 0
        for size in sizes:
            drawn, plan = self._draw(settings, size)
            added = {id(p) for p in params[start:size]}
            mode.update((p, m) for p, m in drawn.items() if id(p) in added)
            start = size
        if plan is not None and len(sizes) > 1:  # the plan shows what trains
            whole = {n for n, p in zip(plan.names, params, strict=True) if mode.get(p) == _WHOLE}
            entries = {n for n, p in zip(plan.names, params, strict=True) if mode.get(p) == _ENTRIES}
            plan = hft.HalfPlan(
                names=plan.names,
                numel=plan.numel,
                units=plan.units,
                stacks=plan.stacks,
                trainable=whole,
                entry_masked=entries,
                options=plan.options,
            )
        return mode, plan, list(sizes)

    def _draw(self, settings: Mapping[str, Any], upto: int) -> tuple[dict[torch.Tensor, str], Any]:
        """Which of the first ``upto`` tensors train (and how) for the round and options in
        ``settings``; changes nothing."""
        ratio, strategy, seed, rnd = (
            float(settings["ratio"]),
            settings["strategy"],
            int(settings["seed"]),
            int(settings["round"]),
        )
        params = self._param_list()[:upto]
        mode: dict[torch.Tensor, str] = {}
        plan = None
        if all("param_names" in g for g in self.param_groups):
            names = [n for g in self.param_groups for n in g["param_names"]][:upto]
            plan = hft.plan_half(
                list(zip(names, params, strict=True)),
                ratio=ratio,
                strategy=strategy,
                seed=seed,
                round=rnd,
                **self._plan_options,
            )
            kept = {n for n, p in zip(names, params, strict=True) if p in self._kept_frozen}
            if kept:
                plan = plan.without(kept)
            for name, p in zip(names, params, strict=True):
                if name in plan.trainable:
                    mode[p] = _WHOLE
                elif name in plan.entry_masked:
                    mode[p] = _ENTRIES
        else:
            if rnd == 0 and not self._built:
                warnings.warn(
                    "HalfAdam got parameters without names, so it cannot pick a category-balanced half of "
                    f"each transformer layer; it trains a random {ratio:.0%} share of the tensors instead. "
                    "Pass model.named_parameters() for HFT's selection.",
                    stacklevel=4,
                )
            if strategy == "parameter":
                mode = {p: _ENTRIES for p in params}
            else:
                count = min(len(params), max(1, round(ratio * len(params))))
                chosen = hft.CounterRng(seed, rnd, "HalfAdam.unnamed").sample(range(len(params)), count)
                mode = {params[i]: _WHOLE for i in chosen}
            mode = {p: m for p, m in mode.items() if p not in self._kept_frozen}
        return mode, plan

    def _check_live_groups(self) -> None:
        """The round's settings edited in ``param_groups`` would not change the installed
        selection (and would make the next checkpoint unloadable): refused."""
        for group in self.param_groups:
            for key, value in self._round_settings.items():
                if group[key] != value:
                    raise ValueError(
                        f"Invalid {key}: {group[key]!r}; HalfAdam's {', '.join(_ROUND_KEYS)} are fixed within a "
                        f"round (this round's {key} is {value!r}): call new_round() to start the next round, or "
                        "build a new HalfAdam with the new value"
                    )

    def _install(self, mode: dict[torch.Tensor, str], plan, sizes: list[int]) -> None:
        """Make ``mode`` the current round's selection (and ``requires_grad`` follow it)."""
        self._mode, self.plan, self._round_sizes = mode, plan, sizes
        self._round_settings = {key: self.param_groups[0][key] for key in _ROUND_KEYS}
        params = self._param_list()
        digest = _digest(params, mode)
        for group in self.param_groups:
            group[DIGEST_KEY] = digest
            group[SIZES_KEY] = list(self._round_sizes)
        if self.param_groups[0]["freeze"] != "requires_grad":
            # freeze="mask" (also when a loaded state dict switches to it): every tensor computes
            # its gradient; give back the requires_grad that an earlier round took
            for p in params:
                if getattr(p, _FROZEN_MARK, False):
                    delattr(p, _FROZEN_MARK)
                    p.requires_grad_(True)
        else:
            for p in params:
                if p in self._kept_frozen:
                    continue
                trainable = p in mode
                p.requires_grad_(trainable)
                if trainable:
                    if getattr(p, _FROZEN_MARK, False):
                        delattr(p, _FROZEN_MARK)
                else:
                    setattr(p, _FROZEN_MARK, True)
                    p.grad = None

    def _policy(self, group, param) -> SelectionPolicy | None:
        mode = self._mode.get(param)
        if mode is None:
            return None
        ratio = float(group["ratio"])
        if mode == _ENTRIES and ratio < 1.0:
            return cached_policy(RANDOM, ratio, seed=int(group["seed"]), counter=self.round)
        return cached_policy(ALL)
