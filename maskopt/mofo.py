"""MoFO: in every tensor, update only the alpha fraction of entries with the largest |momentum|."""

from __future__ import annotations

from typing import Any

import torch

from ._checks import check_choice, check_int, check_range
from .optimizer import MaskedAdam
from .policy import SelectionPolicy, cached_policy
from .selection import ALL, TOPK_GRADIENT, TOPK_MOMENTUM

FILTERS = {"momentum": TOPK_MOMENTUM, "gradient": TOPK_GRADIENT}


class MoFO(MaskedAdam):
    r"""Momentum-Filtered Optimizer (MoFO paper, Algorithm 1), a drop-in for ``torch.optim.AdamW``.

    For every tensor :math:`\theta` with gradient :math:`g` at step :math:`t`:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \quad\text{(every entry)} \\
        S_t &= \text{the } k = \mathrm{topk\_count}(n, \alpha) \text{ entries with the largest } |m_t|
               \text{ (per block of } \texttt{block\_size}\text{)} \\
        \theta_{t,i} &= \theta_{t-1,i}(1 - \eta\lambda) - \eta\,
               \frac{m_{t,i}/(1-\beta_1^t)}{\sqrt{v_{t,i}}/\sqrt{1-\beta_2^t} + \epsilon}
               \quad\text{for } i \in S_t; \text{ other entries keep their exact bits.}

    Exactly ``k = min(n, max(1, floor(alpha * n + 0.5)))`` entries move; ties at the k-th value
    go to the lowest flat index, and NaN ranks as the largest ``|m|``. ``alpha=1.0`` is AdamW
    (bit for bit: ``AdamW(foreach=True)`` on the PyTorch path, ``AdamW(fused=True)`` on the
    compiled CPU step). The full semantics: docs/semantics.md.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts
            (see :func:`maskopt.mofo_param_groups` for the official MoFO grouping).
        lr: learning rate :math:`\eta` (default 1e-3).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1) (default (0.9, 0.999)).
        eps: :math:`\epsilon` added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda` (default 0.0).
        alpha: fraction of each tensor's entries that move, ``0 < alpha <= 1`` (default 0.1;
            the paper uses 5-15 %).
        filter: ``"momentum"`` (default: largest ``|exp_avg|``, the paper) or ``"gradient"``
            (largest ``|grad|``: the paper's gradient-filtered ablation).
        mask_weight_decay: decay only the entries that move (default True); False decays every
            entry, as the official MoFO code does.
        block_size: select per chunk of this many consecutive flat entries instead of per
            tensor (an integer >= 1, or None: per tensor, the default).
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
        filter: str = "momentum",  # noqa: A002 - the MoFO paper's and its official code's name
        mask_weight_decay: bool = True,
        block_size: int | None = None,
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
            filter=filter,
            mask_weight_decay=mask_weight_decay,
            block_size=block_size,
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
        check_choice("filter", group["filter"], tuple(FILTERS))
        check_int("block_size", group.get("block_size"), low=1, allow_none=True)

    def _policy(self, group, param) -> SelectionPolicy:
        alpha = float(group["alpha"])
        if alpha >= 1.0:
            return cached_policy(ALL)
        block_size = group.get("block_size")
        return cached_policy(FILTERS[group["filter"]], alpha, None if block_size is None else int(block_size))
