"""RandomBCD: a random alpha fraction of every tensor's entries, fresh each step."""

from __future__ import annotations

from typing import Any

from .optimizer import MaskedAdam, check_choice, check_range
from .selection import ALL, RANDOM, RANDOM_EXACT


class RandomBCD(MaskedAdam):
    """Randomized block coordinate descent with Adam (the MoFO paper's ablation, Table 6).

    Each entry moves with probability ``alpha``, drawn from a counter-based hash of
    (seed, tensor index, step, flat index): reproducible after resume, identical on the
    PyTorch and Triton paths, nothing mask-sized stored. ``exact=True`` moves exactly
    ``topk_count(n, alpha)`` entries (those with the largest hash keys).
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
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha, seed=seed, exact=exact,
            mask_weight_decay=mask_weight_decay, foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_range("alpha", group["alpha"], 0.0, 1.0, low_open=True)
        check_choice("exact", group["exact"], (True, False))
        seed = group["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r}; allowed: an integer")

    def _selection_of(self, group, param, index):
        alpha = float(group["alpha"])
        if alpha >= 1.0:
            return (ALL, alpha, None)
        return (RANDOM_EXACT if group["exact"] else RANDOM, alpha, None)
