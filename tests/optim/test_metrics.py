"""OP and BWT as the MoFO and HFT papers define them (maskopt.metrics)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskopt.metrics import backward_transfer, bwt, op, overall_performance

# R[i][j]: performance on task j after training task i; None above the diagonal.
R3 = [
    [50.0, None, None],
    [40.0, 60.0, None],
    [30.0, 55.0, 70.0],
]


def test_hand_computed_values():
    # OP = (30 + 55 + 70) / 3
    assert op(R3) == pytest.approx(155.0 / 3)
    # MoFO: ((30-50) + (55-60)) / (3-1) = -12.5
    assert bwt(R3) == pytest.approx(-12.5)
    # HFT: the same sum divided by t = 3
    assert bwt(R3, convention="hft") == pytest.approx(-25.0 / 3)


def test_prefix_t_matches_truncated_matrix():
    assert op(R3, t=2) == pytest.approx((40 + 60) / 2)
    assert bwt(R3, t=2) == pytest.approx(-10.0)
    assert bwt(R3, t=2, convention="hft") == pytest.approx(-5.0)
    assert op(R3, t=1) == 50.0
    assert bwt(R3, t=1, convention="hft") == 0.0
    assert op(R3, t=2) == op([row[:2] for row in R3[:2]])


def test_entries_above_diagonal_are_ignored():
    full = [[50.0, 1.0, 2.0], [40.0, 60.0, 3.0], [30.0, 55.0, 70.0]]
    assert op(full) == op(R3)
    assert bwt(full) == bwt(R3)


def test_losses_flip_sign_so_negative_bwt_is_forgetting():
    losses = [[1.0, None], [1.5, 0.8]]  # task 0's loss went up: forgetting
    assert bwt(losses, higher_is_better=False) == pytest.approx(-0.5)
    assert op(losses, higher_is_better=False) == pytest.approx(-(1.5 + 0.8) / 2)


def test_no_forgetting_gives_zero_bwt():
    R = [[1.0, None], [1.0, 2.0]]
    assert bwt(R) == 0.0


def test_numpy_input():
    np = pytest.importorskip("numpy")
    R = np.array([[50.0, np.nan, np.nan], [40.0, 60.0, np.nan], [30.0, 55.0, 70.0]])
    assert bwt(R) == pytest.approx(-12.5)
    assert op(R, t=np.int64(2)) == pytest.approx(50.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(R=[]), "at least one row"),
        (dict(R=5), "2-D matrix"),
        (dict(R=R3, t=0), "1 <= t <= 3"),
        (dict(R=R3, t=4), "1 <= t <= 3"),
        (dict(R=R3, t=2.0), "t must be an int"),
        (dict(R=[[1.0], [2.0]]), r"R\[1\] has 1 entries"),
        (dict(R=[[1.0], [None, 2.0]]), r"R\[1\]\[0\] is missing"),
        (dict(R=[[1.0], [float("nan"), 2.0]]), "NaN"),
        (dict(R=[[1.0], ["x", 2.0]]), "must be a number"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bwt(**kwargs, convention="hft")
    with pytest.raises(ValueError, match=match):
        overall_performance(**kwargs)


def test_bwt_mofo_needs_two_tasks_and_convention_checked():
    with pytest.raises(ValueError, match="t >= 2"):
        backward_transfer([[1.0]])
    with pytest.raises(ValueError, match="convention"):
        backward_transfer(R3, convention="trace")


matrices = st.integers(min_value=2, max_value=8).flatmap(
    lambda T: st.lists(
        st.lists(st.floats(-100, 100, allow_nan=False), min_size=T, max_size=T),
        min_size=T,
        max_size=T,
    )
)


@settings(max_examples=100, deadline=None)
@given(matrices)
def test_properties(R):
    T = len(R)
    # HFT's BWT is (T-1)/T times MoFO's.
    assert bwt(R, convention="hft") == pytest.approx(bwt(R) * (T - 1) / T, abs=1e-9)
    # OP is the mean of the last row.
    assert op(R) == pytest.approx(sum(R[-1]) / T, abs=1e-9)
    # Shifting every score by a constant shifts OP by it and leaves BWT unchanged.
    shifted = [[x + 3.0 for x in row] for row in R]
    assert op(shifted) == pytest.approx(op(R) + 3.0, abs=1e-9)
    assert bwt(shifted) == pytest.approx(bwt(R), abs=1e-9)
    # Losses: the same numbers, read as lower-is-better, negate both scores.
    assert bwt(R, higher_is_better=False) == pytest.approx(-bwt(R), abs=1e-9)
    assert math.isfinite(op(R, t=1))
