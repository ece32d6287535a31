"""Continual-learning scores: Overall Performance (OP) and Backward Transfer (BWT).

Both take a performance matrix ``R`` where ``R[i][j]`` is the performance (an accuracy, or
any score where higher is better) on task ``j`` measured right after training on task ``i``,
with tasks trained in the order ``0, 1, ..., T-1``. Only the lower triangle (``j <= i``) is
read; entries above the diagonal (performance on tasks not yet trained) may be anything,
including ``None``. Indices here are 0-based; the papers' formulas are 1-based.

The two source papers define the scores slightly differently:

* MoFO (Chen et al., 2024, Sec. 3.1, following Chaudhry et al. 2018 and Lopez-Paz & Ranzato
  2017), after all ``T`` tasks::

      OP  = 1/T     * sum_{i=1..T}   R[T,i]
      BWT = 1/(T-1) * sum_{i=1..T-1} (R[T,i] - R[i,i])

* HFT (Hui et al., 2024, Appendix A.2.2, Eq. 5, following the TRACE benchmark), after the
  first ``t`` tasks::

      OP_t  = 1/t * sum_{i=1..t}   S[t,i]
      BWT_t = 1/t * sum_{i=1..t-1} (S[t,i] - S[i,i])

  The OP definitions agree. HFT's BWT divides by ``t`` instead of ``t - 1``, so for the same
  matrix it is ``(t-1)/t`` times MoFO's (e.g. 7/8 of it for TRACE's 8 tasks); pick the
  convention with ``convention="mofo"`` (default) or ``convention="hft"``.

A negative BWT means forgetting: performance on earlier tasks dropped after learning later
ones. For a loss (lower is better) pass ``higher_is_better=False``; the scores are then
computed on ``-R`` so that the sign convention (negative BWT = forgetting) is kept, and OP is
reported as minus the mean final loss.

Pure Python: no torch or numpy needed (numpy arrays and nested sequences both work).
"""

from __future__ import annotations

import math
import operator
from typing import Any

__all__ = ["overall_performance", "backward_transfer", "op", "bwt", "CONVENTIONS"]

CONVENTIONS = ("mofo", "hft")


def _lower_triangle(R: Any, t: int | None, higher_is_better: bool) -> tuple[list[list[float]], int]:
    """Validated rows ``0..t-1`` of ``R``, each cut to its first ``row+1`` entries, as floats."""
    try:
        rows = [list(row) for row in R]
    except TypeError:
        raise ValueError(
            "R must be a 2-D matrix: a sequence of rows, R[i][j] = performance "
            "on task j after training task i"
        ) from None
    T = len(rows)
    if T == 0:
        raise ValueError("R must have at least one row (one trained task)")
    if t is None:
        t = T
    else:
        t_in = t
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)
        except TypeError:
            raise ValueError(f"t must be an int with 1 <= t <= {T}, got {t_in!r}") from None
        if not 1 <= t <= T:
            raise ValueError(f"t must satisfy 1 <= t <= {T} (the number of rows of R), got {t_in!r}")
    out: list[list[float]] = []
    sign = 1.0 if higher_is_better else -1.0
    for i in range(t):
        row = rows[i]
        if len(row) < i + 1:
            raise ValueError(
                f"R[{i}] has {len(row)} entries; it needs at least {i + 1} "
                f"(performance on tasks 0..{i} after training task {i})"
            )
        vals = []
        for j in range(i + 1):
            x = row[j]
            if x is None:
                raise ValueError(f"R[{i}][{j}] is missing (None); the lower triangle must be filled")
            try:
                fx = float(x)
            except (TypeError, ValueError):
                raise ValueError(f"R[{i}][{j}] must be a number, got {x!r}") from None
            if math.isnan(fx):
                raise ValueError(f"R[{i}][{j}] is NaN; the lower triangle must be filled")
            vals.append(sign * fx)
        out.append(vals)
    return out, t


def overall_performance(R: Any, t: int | None = None, *, higher_is_better: bool = True) -> float:
    """Overall Performance after the first ``t`` tasks (default: all rows of ``R``).

    ``OP_t = (1/t) * sum_{i<t} R[t-1][i]`` (0-based) -- the mean performance over all tasks
    seen so far, measured after training the ``t``-th task. This is MoFO's ``OP`` (Sec. 3.1)
    and HFT's ``OP_t`` (Appendix A.2.2, Eq. 5); the two papers agree on it.

    With ``higher_is_better=False`` (``R`` holds losses) the result is ``-mean(final losses)``.

    Args:
        R: the performance matrix, a sequence of rows (nested lists, tuples or a NumPy
            array): ``R[i][j]`` is the score on task ``j`` right after training task ``i``.
            Rows ``0..t-1`` must be filled up to their diagonal with numbers (not None or
            NaN); entries above the diagonal and the entries of rows from ``t`` on are not
            checked (None allowed).
        t: how many tasks have been trained: the scores are taken after task ``t`` (row
            ``t-1``); an int with ``1 <= t <= len(R)``. None (default) uses every row.
        higher_is_better: True (default) when ``R`` holds scores such as accuracies; False
            when it holds losses (the mean is then taken on ``-R``). Keyword-only.

    Returns:
        OP as a Python float.

    Raises:
        ValueError: ``R`` is not a matrix, ``t`` is out of range, or a needed entry is
            missing, NaN or not a number.
    """
    rows, t = _lower_triangle(R, t, higher_is_better)
    last = rows[t - 1]
    return sum(last) / t


def backward_transfer(
    R: Any, t: int | None = None, *, convention: str = "mofo", higher_is_better: bool = True
) -> float:
    """Backward Transfer after the first ``t`` tasks (default: all rows of ``R``).

    Sum of ``R[t-1][i] - R[i][i]`` over the earlier tasks ``i < t-1`` (0-based): how much the
    performance on each earlier task changed between right after it was learned and the end.
    Negative means forgetting.

    * ``convention="mofo"`` (default): divided by ``t - 1`` -- MoFO's ``BWT`` (Sec. 3.1, from
      Lopez-Paz & Ranzato 2017). Needs ``t >= 2``.
    * ``convention="hft"``: divided by ``t`` -- HFT's ``BWT_t`` (Appendix A.2.2, Eq. 5, from
      TRACE). Equals ``(t-1)/t`` times the MoFO value; ``BWT_1 = 0``.

    With ``higher_is_better=False`` (``R`` holds losses) the differences are taken on ``-R``,
    so a loss that went up still gives a negative BWT.

    Args:
        R: the performance matrix, a sequence of rows (nested lists, tuples or a NumPy
            array): ``R[i][j]`` is the score on task ``j`` right after training task ``i``.
            Rows ``0..t-1`` must be filled up to their diagonal with numbers (not None or
            NaN); entries above the diagonal and the entries of rows from ``t`` on are not
            checked (None allowed).
        t: how many tasks have been trained: the scores are taken after task ``t`` (row
            ``t-1``); an int with ``1 <= t <= len(R)``. None (default) uses every row.
        convention: ``"mofo"`` (default, divide by ``t - 1``) or ``"hft"`` (divide by
            ``t``). Keyword-only.
        higher_is_better: True (default) when ``R`` holds scores such as accuracies; False
            when it holds losses (differences taken on ``-R``). Keyword-only.

    Returns:
        BWT as a Python float.

    Raises:
        ValueError: an unknown ``convention``; ``t < 2`` with ``convention="mofo"``; or
            ``R``/``t`` as in :func:`overall_performance`.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    rows, t = _lower_triangle(R, t, higher_is_better)
    last = rows[t - 1]
    total = sum(last[i] - rows[i][i] for i in range(t - 1))
    if convention == "hft":
        return total / t
    if t < 2:
        raise ValueError(
            "BWT with convention='mofo' divides by t-1 and needs t >= 2 tasks "
            "(use convention='hft' for BWT_1 = 0)"
        )
    return total / (t - 1)


# Short aliases, as the papers write them.
op = overall_performance
bwt = backward_transfer
