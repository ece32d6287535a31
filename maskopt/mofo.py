"""MoFO: in every tensor, update only the alpha fraction of entries with the largest |momentum|."""

from __future__ import annotations

from typing import Any

from .optimizer import MaskedAdam, check_choice, check_range
from .selection import ALL, TOPK_GRADIENT, TOPK_MOMENTUM

FILTERS = {"momentum": TOPK_MOMENTUM, "gradient": TOPK_GRADIENT}


class MoFO(MaskedAdam):
    """Momentum-Filtered Optimizer (MoFO paper, Algorithm 1), a drop-in for ``torch.optim.AdamW``.

    Every step updates the moments of all entries, then moves only the ``k = topk_count(n, alpha)``
    entries of each tensor (or of each ``block_size`` chunk) with the largest ``|exp_avg|``
    (``filter="gradient"``: largest ``|grad|``, the paper's gradient-filtered BCD ablation).
    Exactly ``k`` entries move; ties go to the lowest flat index. Decoupled weight decay
    applies to the moved entries only, unless ``mask_weight_decay=False`` (all entries, as the
    official MoFO code does). ``alpha=1.0`` is AdamW.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        alpha: float = 0.1,
        filter: str = "momentum",
        mask_weight_decay: bool = True,
        block_size: int | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha, filter=filter,
            mask_weight_decay=mask_weight_decay, block_size=block_size, foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_range("alpha", group["alpha"], 0.0, 1.0, low_open=True)
        check_choice("filter", group["filter"], tuple(FILTERS))
        block_size = group.get("block_size")
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"Invalid block_size: {block_size!r}; allowed: None or an integer >= 1")

    def _selection_of(self, group, param, index):
        alpha = float(group["alpha"])
        return (ALL if alpha >= 1.0 else FILTERS[group["filter"]], alpha, None)
