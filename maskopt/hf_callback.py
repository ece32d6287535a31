"""The Hugging Face Trainer callback that logs :class:`~maskopt.telemetry.UpdateTelemetry` numbers.

A module of its own because it imports ``transformers``, which the rest of maskopt does not need:
``import maskopt`` works without it, ``import maskopt.hf_callback`` raises ``ImportError``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from .telemetry import UpdateTelemetry, unwrap_optimizer

__all__ = ["UpdateTelemetryCallback"]


class UpdateTelemetryCallback(TrainerCallback):
    """Adds :class:`UpdateTelemetry` numbers to the Trainer's training logs.

    At every training log (every ``logging_steps``, and the final ``train_loss`` log) it
    adds ``<prefix>updated_fraction_mean``, ``<prefix>updated_fraction_total`` and, with
    ``track_distance=True``, ``<prefix>distance`` and ``<prefix>changed_fraction``;
    ``per_tensor=True`` adds the per-tensor values. It finds the optimizer in the
    callback arguments (unwrapping accelerate's wrapper) and attaches itself at
    ``on_train_begin``, before the first step, so θ0 is the weights training starts from.
    The telemetry is ``callback.telemetry``; it unhooks at ``on_train_end``.

    The Trainer shows ``on_log`` callbacks the logs in callback order, so reporting
    integrations added before this callback (``report_to``) do not see its keys; use
    :meth:`add_to` to put it first. ``trainer.state.log_history`` gets them either way.
    """

    def __init__(
        self,
        *,
        per_tensor: bool = False,
        track_distance: bool = False,
        reference_device: torch.device | str | None = None,
        prefix: str = "maskopt/",
    ) -> None:
        self.per_tensor = per_tensor
        self.track_distance = track_distance
        self.reference_device = reference_device
        self.prefix = prefix
        self.telemetry: UpdateTelemetry | None = None

    @classmethod
    def add_to(cls, trainer, **kwargs) -> UpdateTelemetryCallback:
        """A new callback, placed first in ``trainer``'s callbacks so that every reporting
        integration logs its keys; returns it."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def _attach(self, kwargs: dict[str, Any]) -> None:
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            return
        inner = unwrap_optimizer(optimizer)
        t = self.telemetry
        if t is not None and not t.removed and t.optimizer is inner:
            return
        if t is not None:
            t.remove()
        model = kwargs.get("model")
        named = model.named_parameters() if isinstance(model, torch.nn.Module) else None
        self.telemetry = UpdateTelemetry(
            inner, named, track_distance=self.track_distance, reference_device=self.reference_device
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self._attach(kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        self._attach(kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._attach(kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not ("loss" in logs or "train_loss" in logs):
            return  # evaluation and other logs
        self._attach(kwargs)
        if self.telemetry is None:
            return
        values = self.telemetry.as_dict(sync=True, per_tensor=self.per_tensor, prefix=self.prefix)
        if not values:
            return
        # Trainer.log appends a copy of `logs` to log_history before calling on_log.
        history = state.log_history
        if history and history[-1] is not logs and all(k in history[-1] for k in logs):
            history[-1].update(values)
        logs.update(values)

    def on_train_end(self, args, state, control, **kwargs):
        if self.telemetry is not None:
            self.telemetry.remove()
