"""HFT (Half Fine-Tuning) parameter selection, for ``HalfAdam`` and for any other optimizer.

The HFT paper (Algorithm 1) trains, in each training round, half of the parameters of every
transformer layer and freezes the other half, chosen per *category* inside each layer: two of
the four attention matrices, one of the two norms, and for the three feed-forward matrices two
in a random half of the layers and one in the others. Embeddings and ``lm_head`` stay
trainable (their Table 5 shows that freezing them hurts).

This module makes that a model-level operation that works on any architecture:

* :func:`plan_half` -- the selection. Takes ``model.named_parameters()`` (what an optimizer
  sees; ``HalfAdam`` calls it this way) or the model itself (then module types help to
  classify units; the result is the same whenever the names suffice). Returns a
  :class:`HalfPlan`: ``trainable``, ``entry_masked``, ``frozen`` name sets and a ``summary()``.
* :func:`freeze_half` -- plan and apply it to a model (sets ``requires_grad``), so a Hugging
  Face ``Trainer`` or any stock optimizer trains only the selected half.
* :func:`half_reset` -- the paper's pilot experiment: put the frozen half of a fine-tuned model
  back to the pre-trained weights.

Vocabulary:

* **layer stack** -- the repeated blocks ``<prefix>.<i>.`` (``model.layers.3.``,
  ``transformer.h.3.``, ``encoder.layer.3.``): the outermost indexed container whose every
  block holds at least two units. Encoder-decoder models have two stacks; each is handled on
  its own. ``layers="model.layers"`` overrides the detection.
* **unit** -- a weight together with its bias (``x.weight`` + ``x.bias``, ``x_weight`` +
  ``x_bias``, ``x`` + ``x_bias``); any other parameter is a unit of its own.
* **category** -- what a unit inside a layer is: ``"attention"``, ``"ffn"``, ``"norm"``, and
  for Mixture-of-Experts layers ``"router"`` and ``"experts"`` (see below). A unit that no rule
  recognises raises :class:`HFTClassificationError` listing it; pass ``classify=`` to fix it.

The category rule, for ratio ``p`` and a category with ``n`` units in each of ``L`` layers:
each layer trains ``floor(p*n)`` or ``ceil(p*n)`` of its units; the layers that get the
ceiling are drawn at random so that the total is ``round(p*n*L)`` (halves round down, as the
paper's ``len(layers)//2``). At ``p=0.5`` on Llama this is exactly Algorithm 1.

Mixture of Experts (the paper leaves it open). Routed experts are FFNs, so each expert is
half-trained by the FFN rule, not whole experts frozen (HFT's own finding is that the
finer-grained split forgets least, and every expert keeps learning from the tokens routed to
it): with one module per expert (``experts.<e>.w1``) the groups of the rule are the (layer,
expert) pairs -- in each expert 2 of {gate, up, down} or 1, total ``round(p*3*E*L)``; with the
fused expert tensors of transformers >= 5 (``experts.gate_up_proj``, ``experts.down_proj``,
shape ``(E, ., .)``) those two tensors are the units, so each layer trains one of them for all
its experts. Routers (``mlp.gate``/``router`` and Qwen-MoE's ``shared_expert_gate``) are their
own category (with one router per layer: trained in half of the layers). A shared expert is a
dense FFN (category ``"ffn"``).

The selection is a pure function of (parameter names and sizes, ratio, strategy, seed, round,
options): it uses its own counter-based generator, never torch's or Python's global RNG.

Where each concept lives:

* ``names`` -- unit keys, wrapper prefixes (DDP, torch.compile), layer-stack detection;
* ``categories`` -- the built-in category rules (including the one "is this a norm" rule),
  the ``classify=`` hook, :class:`HFTClassificationError`;
* ``units`` -- :class:`Unit`: a unit placed in its stack and layer, with its category;
* ``strategies`` -- the four strategies, one function each, in a registry; :func:`entry_mask`;
* ``rng`` -- :class:`~maskopt.hft.rng.CounterRng`, the counter-based generator;
* ``checks`` -- the allowed option values and one check per argument (shared with HalfAdam);
* ``plan`` -- :class:`HalfPlan` and its counts, :func:`plan_half`, :func:`find_layer_stacks`;
* ``report`` -- :meth:`HalfPlan.summary`'s text tables;
* ``hooks`` -- what :meth:`HalfPlan.apply` installs on a model, kept per model;
* ``apply`` -- :func:`freeze_half`, :func:`unfreeze`, :func:`half_reset`.
"""

from __future__ import annotations

from .apply import freeze_half, half_reset, unfreeze

# Importable from maskopt.hft though not in __all__: the classify() results and hook type and
# the unit key rule, which callers use to write classify hooks; and what HalfAdam shares with
# the planner (its option checks and the generator of its unnamed fallback).
from .categories import (
    ClassifyHook,  # noqa: F401
    HFTClassificationError,
)
from .checks import BALANCES, CATEGORIES, FREEZE, FREEZE_MODES, KEEP, STRATEGIES, check_plan_options  # noqa: F401
from .names import unit_key  # noqa: F401
from .plan import HalfPlan, find_layer_stacks, plan_half
from .rng import CounterRng  # noqa: F401
from .strategies import entry_mask
from .units import Unit

__all__ = [
    "CATEGORIES",
    "STRATEGIES",
    "FREEZE_MODES",
    "BALANCES",
    "HFTClassificationError",
    "HalfPlan",
    "Unit",
    "plan_half",
    "freeze_half",
    "unfreeze",
    "half_reset",
    "entry_mask",
    "find_layer_stacks",
]
