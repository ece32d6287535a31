"""The fine-tuning methods the forgetting benchmark compares, by name, and their families.

A family is one method with its knob (lr for all; alpha for MoFO and RandomBCD, rank for LoRA,
lambda for WiSE-FT): the trade-off curves and the matched-learning tables are per family.
"""

from __future__ import annotations

import _forgetting_peers as peers
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
# Optimizers of maskopt and torch: the ones the continual-learning experiment can run.
OPTIMIZERS = tuple(LABELS)
# WiSE-FT: theta0 + lambda (theta_AdamW - theta0) at each lambda, from every AdamW run (no training).
WISE_LAMBDAS = (0.2, 0.4, 0.6, 0.8)
WISE = "wiseft"
LABELS.update(peers.LABELS)
LABELS[WISE] = "WiSE-FT of AdamW"
LABELS.update({f"{WISE}{round(100 * x)}": f"WiSE-FT λ={x:g}" for x in WISE_LAMBDAS})
# What --optimizers accepts: "wiseft" stands for all its lambdas.
KNOWN = OPTIMIZERS + tuple(peers.LABELS) + (WISE,)
# The MoFO paper's ablations, against MoFO 15 %: the gradient filter and a random selection at
# the same fraction (Table 6), and a smaller fraction (Sec. 5.2).
ABLATION_BASELINE = "mofo15"
ABLATIONS = ("mofo15-grad", "rbcd15", "mofo5")
BETAS = (0.9, 0.999)
EPS = 1e-8

FAMILY_LABELS = {
    "adamw": "AdamW (lr)",
    WISE: "WiSE-FT of AdamW (λ)",
    "halfadam": "HalfAdam (lr)",
    "mofo": "MoFO (α, lr)",
    "mofo-grad": "MoFO-grad (α, lr)",
    "rbcd": "RandomBCD (α, lr)",
    "lora": "LoRA (rank, lr)",
    "badam-layer": "BAdam layer (lr)",
    "badam-ratio": "BAdam ratio (lr)",
    "lisa": "LISA (lr)",
}


def family(name: str) -> str:
    """The family of a row's method name: ``mofo15`` -> ``mofo``, ``wiseft40`` -> ``wiseft``."""
    if name.startswith("mofo"):
        return "mofo-grad" if name.endswith("-grad") else "mofo"
    for prefix in ("rbcd", "lora", WISE):
        if name.startswith(prefix):
            return prefix
    return name


OPTIMIZER_FAMILIES = ("adamw", "halfadam", "mofo", "mofo-grad", "rbcd")


def is_peer(name: str) -> bool:
    return name in peers.LABELS


def make_optimizer(name: str, model: torch.nn.Module, lr: float, seed: int) -> torch.optim.Optimizer:
    """``name`` from OPTIMIZERS; every optimizer gets AdamW's betas, eps 1e-8 and no weight decay."""
    common = dict(lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **common)
    from maskopt import HalfAdam, MoFO, RandomBCD

    # The PyTorch path, which computed the shipped tables: the compiled CPU step (the default
    # on CPU) rounds its square root differently (docs/semantics.md), so its runs would differ
    # from them in the last digits and --merge would refuse to mix the two.
    common["fused"] = False

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
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
