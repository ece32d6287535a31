"""The optimizers the forgetting benchmark compares, by name."""

from __future__ import annotations

import torch

# Alphas: the MoFO paper's 5 % (continual) and 15 % (instruction tuning); the two ablations
# (gradient filter, random) use 15 % to pair with MoFO 15 %.
LABELS = {
    "adamw": "AdamW",
    "halfadam": "HalfAdam (HFT)",
    "mofo5": "MoFO a=5%",
    "mofo15": "MoFO a=15%",
    "mofo15-grad": "MoFO-grad a=15%",
    "rbcd15": "RandomBCD a=15%",
    "rbcd5": "RandomBCD a=5%",
    "mofo5-grad": "MoFO-grad a=5%",
}
KNOWN = tuple(LABELS)
# The MoFO paper's ablations, against MoFO 15 %: the gradient filter and a random selection at
# the same fraction (Table 6), and a smaller fraction (Sec. 5.2).
ABLATION_BASELINE = "mofo15"
ABLATIONS = ("mofo15-grad", "rbcd15", "mofo5")
BETAS = (0.9, 0.999)


def make_optimizer(name: str, model: torch.nn.Module, lr: float, seed: int) -> torch.optim.Optimizer:
    """``name`` from KNOWN; every optimizer gets AdamW's betas, eps 1e-8 and no weight decay."""
    common = dict(lr=lr, betas=BETAS, eps=1e-8, weight_decay=0.0)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **common)
    from maskopt import HalfAdam, MoFO, RandomBCD

    if name == "halfadam":
        return HalfAdam(model.named_parameters(), seed=seed, **common)
    if name.startswith("mofo"):
        alpha = int(name[4:].split("-")[0]) / 100
        return MoFO(
            model.parameters(),
            alpha=alpha,
            filter="gradient" if name.endswith("-grad") else "momentum",
            **common,
        )
    if name.startswith("rbcd"):
        return RandomBCD(model.parameters(), alpha=int(name[4:]) / 100, seed=seed, **common)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(KNOWN)}")
