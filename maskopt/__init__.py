"""maskopt: drop-in AdamW replacements that forget less by updating only part of the model.

- ``MoFO``: in every tensor, the alpha fraction of entries with the largest |momentum|.
- ``RandomBCD``: a random alpha fraction of every tensor's entries, fresh each step.
- ``HalfAdam``: Half Fine-Tuning, a category-balanced half of every transformer layer per round.
"""

from . import functional
from .groups import mofo_param_groups
from .half_adam import HalfAdam
from .mofo import MoFO
from .optimizer import MaskedAdam
from .policy import SelectionPolicy
from .random_bcd import RandomBCD
from .selection import random_masks, topk_count, topk_masks
from .telemetry import UpdateTelemetry

__all__ = [
    "HalfAdam",
    "MaskedAdam",
    "MoFO",
    "RandomBCD",
    "SelectionPolicy",
    "UpdateTelemetry",
    "functional",
    "mofo_param_groups",
    "random_masks",
    "topk_count",
    "topk_masks",
]
__version__ = "0.6.0"
