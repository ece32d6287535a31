"""Argument checks shared by the optimizers and the HFT planner: each raises
``ValueError("Invalid <name>: <value>; allowed ...")`` naming the argument and what it allows."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, Literal, overload

import torch


def as_float(value: Any, name: str) -> float:
    """``value`` as a float: a real number (Python or NumPy, not a bool) or a one-element
    tensor; anything else is a ValueError naming ``name``.

    Args:
        value: the value to convert.
        name: the argument's name, used in the message.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise ValueError(
                f"Invalid {name}: expected a number, got a tensor of shape {tuple(value.shape)} "
                f"and dtype {value.dtype}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: expected a number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_range(name: str, value: Any, low: float, high: float, *, low_open=False, high_open=False) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a real number (or a one-element
    tensor) with ``low (<|<=) value (<|<=) high``.

    Args:
        name: the argument's name, used in the message.
        value: the value to check.
        low, high: the bounds (``-math.inf`` / ``math.inf`` for none).
        low_open, high_open: exclude the bound itself.
    """
    lo = f"{low:g} {'<' if low_open else '<='} " if low != -math.inf else ""
    hi = f" {'<' if high_open else '<='} {high:g}" if high != math.inf else ""
    try:
        x = as_float(value, name)
    except ValueError:
        x = math.nan
    ok = not math.isnan(x)
    ok = ok and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; allowed: a number with {lo}{name}{hi}")


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value`` if it is one of ``allowed``, else a ValueError naming ``name`` and listing them.

    Args:
        name: the argument's name, used in the message.
        value: the value to check; ``True``/``False`` only match booleans (``1`` is not ``True``).
        allowed: the allowed values.
    """
    allowed = tuple(allowed)
    ok = any(
        value is a if isinstance(a, bool) or a is None else (not isinstance(value, bool) and value == a)
        for a in allowed
    )
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; allowed values: {', '.join(map(repr, allowed))}")
    return value


# the overloads tell mypy that only allow_none=True can give None
@overload
def check_int(
    name: str, value: Any, *, low: int | None = None, allow_none: Literal[False] = False
) -> int: ...
@overload
def check_int(name: str, value: Any, *, low: int | None = None, allow_none: bool) -> int | None: ...
def check_int(name: str, value: Any, *, low: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` as a Python int if it is an integer (Python or NumPy, not a bool) ``>= low``
    (or None when ``allow_none``), else a ValueError naming ``name``.

    Args:
        name: the argument's name, used in the message.
        value: the value to check.
        low: the smallest allowed value (None: no bound).
        allow_none: whether None is allowed.
    """
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or (low is not None and value < low)
    ):
        allowed = "an integer" + (f" >= {low}" if low is not None else "")
        raise ValueError(f"Invalid {name}: {value!r}; allowed: {'None or ' if allow_none else ''}{allowed}")
    return int(value)


def check_gradient(
    who: str, what: str, param: torch.Tensor, grad: torch.Tensor, moment: torch.Tensor | None = None
) -> None:
    """Raise RuntimeError unless ``grad`` is a dense real gradient of ``param``'s shape and
    device, ``param`` is floating point and its first moment (if any) has its shape.

    Args:
        who: the optimizer's name, starting the message.
        what: how the message names ``param`` (e.g. ``"parameter 3"``).
        param: the tensor to step.
        grad: its gradient.
        moment: its ``exp_avg`` when it has state, else None.
    """
    if grad.is_sparse:
        raise RuntimeError(f"{who} does not support sparse gradients")
    if torch.is_complex(param) or torch.is_complex(grad):
        raise RuntimeError(f"{who} does not support complex parameters or gradients")
    if not param.is_floating_point():
        raise RuntimeError(f"{who} needs floating-point parameters, got {param.dtype}")
    if grad.shape != param.shape or grad.device != param.device:
        raise RuntimeError(
            f"{who}: the gradient of {what} has shape {tuple(grad.shape)} on {grad.device}; "
            f"{what} has shape {tuple(param.shape)} on {param.device}"
        )
    if torch.is_tensor(moment) and moment.shape != param.shape:
        raise RuntimeError(
            f"{who}: {what} has shape {tuple(param.shape)} but its optimizer state has shape "
            f"{tuple(moment.shape)} (was the parameter replaced?)"
        )


def check_state(who: str, what: str, param: torch.Tensor, state: dict) -> None:
    """Raise ValueError unless ``param``'s optimizer state can be stepped: moments on the
    parameter's device with its shape, floating point; a step counter that is a finite number
    ``>= 0``. A counter on an accelerator is not read (that would synchronise with the host),
    nor while torch.compile traces the step.

    Args:
        who: the optimizer's name, starting the message.
        what: how the message names ``param`` (e.g. ``"parameter 3"``).
        param: the (local) tensor to step.
        state: its ``optimizer.state`` entry (empty before its first step).
    """
    for key in ("exp_avg", "exp_avg_sq"):
        moment = state.get(key)
        if moment is None:
            continue
        if not torch.is_tensor(moment) or not moment.is_floating_point():
            raise ValueError(
                f"{who}: state[{key!r}] of {what} must be a floating-point tensor, got {moment!r}"
            )
        if moment.device != param.device or moment.shape != param.shape:
            raise ValueError(
                f"{who}: state[{key!r}] of {what} has shape {tuple(moment.shape)} on {moment.device}; "
                f"{what} has shape {tuple(param.shape)} on {param.device}"
            )
    step = state.get("step")
    if step is None or (torch.is_tensor(step) and step.device.type != "cpu") or torch.compiler.is_compiling():
        return  # reading it would synchronise with a GPU, or guard a traced graph on its value
    try:
        value = as_float(step, "step")
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (torch.is_tensor(step) and step.numel() != 1):
        raise ValueError(
            f"{who}: state['step'] of {what} is {step!r}; allowed: a finite number >= 0 (the steps taken)"
        )
