"""What a practitioner would use instead of MoFO or HalfAdam, as fine-tuning methods of the benchmark.

* LoRA through ``peft``: adapters of rank r (alpha = 2r, as in Biderman et al. 2024, "LoRA
  Learns Less and Forgets Less") on every attention and MLP projection; the embedding, the
  norms and the head stay frozen. It is measured on the merged weights.
* BAdam through the ``badam`` package (Luo et al., NeurIPS 2024): ``BlockOptimizer`` (layer
  mode: one decoder layer trains at a time, switched every ``SWITCH_EVERY`` steps in a random
  order, Adam state reset at each switch; LLaMA-Factory's ``badam_mode=layer``) and
  ``BlockOptimizerRatio`` (ratio mode: a ``BADAM_RATIO`` share of each matrix's entries, an
  adjacent block that moves on every ``SWITCH_EVERY`` steps). Both leave the embedding and the
  head frozen, the package's default.
* LISA-style layer sampling (Pan et al. 2024, as LMFlow ships it): every ``LISA_PERIOD`` steps
  ``LISA_LAYERS`` decoder layers are drawn at random to train, the others are frozen; the
  embedding and the head always train. One AdamW keeps its state across periods, as LMFlow's
  callback does. A baseline of this benchmark only, not part of ``maskopt``.

WiSE-FT (weight interpolation of a finished AdamW run) needs no training and lives in
``_forgetting_finetune``.

``setup(name, model, lr, seed)`` returns a ``Trainer``: the module to train (``model`` itself or
a wrapper around it), its optimizer, a hook called before every step, and ``finish()`` which
returns a plain model with ``model``'s parameters in ``model``'s order for measuring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from collections.abc import Callable

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANKS = (4, 16, 64)
SWITCH_EVERY = 50  # BAdam's switch interval (LLaMA-Factory's badam_switch_interval default)
BADAM_RATIO = 0.15  # RandomBCD's and MoFO's 15 %, so the ratio mode pairs with them
LISA_LAYERS = 1  # of the 4-5 decoder layers here (LISA uses 2 of 32)
LISA_PERIOD = 20  # LMFlow's lisa_interval_steps default

LABELS = {
    **{f"lora{r}": f"LoRA r={r}" for r in LORA_RANKS},
    "badam-layer": "BAdam layer",
    "badam-ratio": f"BAdam ratio {BADAM_RATIO:.0%}",
    "lisa": f"LISA {LISA_LAYERS} layer/{LISA_PERIOD} steps",
}


@dataclasses.dataclass
class Trainer:
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    before_step: Callable[[int], None] | None
    finish: Callable[[], torch.nn.Module]


def _decoder_layers(model) -> list[torch.nn.Module]:
    return list(model.model.layers)


def lora(model, rank: int, lr: float, betas, eps: float) -> Trainer:
    import peft

    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none"
    )
    wrapped = peft.get_peft_model(model, config)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    return Trainer(wrapped, opt, None, wrapped.merge_and_unload)


def _quiet_badam():
    """BAdam prints every block order and warns that float32 weights lose its memory saving (true,
    and irrelevant here); keep the benchmark's log readable."""
    import badam.block_optim

    badam.block_optim.print_rank_0 = lambda *args, **kwargs: None
    warnings.filterwarnings("ignore", message="BAdam expect model", category=UserWarning)
    return badam


def badam_layer(model, lr: float, betas, eps: float) -> Trainer:
    badam = _quiet_badam()
    base = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        opt = badam.BlockOptimizer(
            base,
            list(model.named_parameters()),
            switch_block_every=SWITCH_EVERY,
            switch_mode="random",
            verbose=0,
        )
    return Trainer(model, opt, None, lambda: model)


def badam_ratio(model, lr: float, betas, eps: float) -> Trainer:
    badam = _quiet_badam()
    named = list(model.named_parameters())
    opt = badam.BlockOptimizerRatio(
        [{"params": [p for _, p in named]}],
        named,
        update_ratio=BADAM_RATIO,
        switch_every=SWITCH_EVERY,
        lr=lr,
        betas=betas,
        eps=eps,
        verbose=0,
    )
    return Trainer(model, opt, None, lambda: model)


def lisa(model, lr: float, betas, eps: float, seed: int) -> Trainer:
    layers = _decoder_layers(model)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=0.0)

    def before_step(step: int) -> None:
        if (step - 1) % LISA_PERIOD:
            return
        active = set(torch.randperm(len(layers), generator=gen)[:LISA_LAYERS].tolist())
        for i, layer in enumerate(layers):
            layer.requires_grad_(i in active)

    return Trainer(model, opt, before_step, lambda: model)


def setup(name: str, model, lr: float, seed: int, betas, eps: float) -> Trainer:
    """The Trainer of peer ``name`` (a key of LABELS) on ``model``, which it may modify in place."""
    if name.startswith("lora"):
        return lora(model, int(name[4:]), lr, betas, eps)
    # BAdam draws its block order and ratio offsets from torch's global generator.
    torch.manual_seed(seed)
    if name == "badam-layer":
        return badam_layer(model, lr, betas, eps)
    if name == "badam-ratio":
        return badam_ratio(model, lr, betas, eps)
    if name == "lisa":
        return lisa(model, lr, betas, eps, seed)
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(LABELS)}")
