"""RandomBCD: a random alpha fraction of every tensor's entries, fresh each step."""

from __future__ import annotations

from typing import Any

import torch

from ._checks import check_choice, check_int, check_range
from .optimizer import MaskedAdam
from .policy import SelectionPolicy, cached_policy
from .selection import ALL, RANDOM, RANDOM_EXACT


class RandomBCD(MaskedAdam):
    r"""Randomized block coordinate descent with Adam (the MoFO paper's ablation, Table 6).

    The AdamW step of :class:`maskopt.MoFO` with a random set of entries in place of the
    top-k: each entry moves with probability ``alpha``, drawn from a counter-based hash of
    (seed, tensor index, step, flat index) (``maskopt._hash`` states it) -- reproducible after a
    resume, identical on the PyTorch and Triton paths, nothing mask-sized stored. Moments
    advance for every entry. The step counter is float32, as AdamW's: past 2**24 steps of one
    tensor it stops counting and the mask stops changing. Semantics: docs/semantics.md.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2)``, each in [0, 1) (default (0.9, 0.999)).
        eps: term added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay (default 0.0).
        alpha: probability that an entry moves in a step, ``0 < alpha <= 1`` (default 0.1).
        seed: integer seed of the hash (default 0).
        exact: move exactly ``topk_count(n, alpha)`` entries per tensor (those with the
            largest hash values) instead of each with probability ``alpha`` (default False).
        mask_weight_decay: decay only the entries that move (default True).
        foreach: None (default): the best path (below); True: foreach ops on the PyTorch path;
            False: the PyTorch path one tensor at a time.
        fused: None (default): float32 CPU tensors take the compiled CPU step
            (``maskopt.cpu_step``, built on first use; the PyTorch path with one warning where
            no C++ compiler is found), the rest the PyTorch path, on CUDA too until a GPU has
            run the current Triton kernels (docs/performance.md); True: the Triton path on
            CUDA, a tensor it cannot take (float64, a non-contiguous layout) refused before any
            change; False: the PyTorch path.
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
        alpha: float = 0.1,
        seed: int = 0,
        exact: bool = False,
        mask_weight_decay: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        *,
        maximize: bool = False,
        moment_dtype: torch.dtype | None = None,
        amsgrad: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            alpha=alpha,
            seed=seed,
            exact=exact,
            mask_weight_decay=mask_weight_decay,
            foreach=foreach,
            fused=fused,
            maximize=maximize,
            moment_dtype=moment_dtype,
        )
        super().__init__(
            params, defaults, amsgrad=amsgrad, capturable=capturable, differentiable=differentiable
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_range("alpha", group["alpha"], 0.0, 1.0, low_open=True)
        check_choice("exact", group["exact"], (True, False))
        check_int("seed", group["seed"])

    def _policy(self, group, param) -> SelectionPolicy:
        alpha = float(group["alpha"])
        if alpha >= 1.0:
            return cached_policy(ALL)
        return cached_policy(RANDOM_EXACT if group["exact"] else RANDOM, alpha, seed=int(group["seed"]))
