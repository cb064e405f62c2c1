"""Metric definitions (METHODS.md "Metrics") on hand-checked matrices."""

import math

import pytest

from sharecl.metrics import average_incremental_accuracy, backward_transfer, final_average_accuracy, forgetting, summarize

R = [[0.9, None, None],
     [0.8, 0.7, None],
     [0.6, 0.75, 0.5]]


def test_values():
    assert final_average_accuracy(R) == pytest.approx((0.6 + 0.75 + 0.5) / 3)
    assert average_incremental_accuracy(R) == pytest.approx((0.9 + 0.75 + 0.6166666666) / 3)
    # forgetting uses the best earlier accuracy: task 0 max(0.9, 0.8) − 0.6; task 1 0.7 − 0.75
    assert forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.7 - 0.75)) / 2)
    assert backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.75 - 0.7)) / 2)


def test_single_task_and_errors():
    s = summarize([[0.5]])
    assert s["final_average_accuracy"] == 0.5 and math.isnan(s["forgetting"]) and math.isnan(s["bwt"])
    with pytest.raises(ValueError, match="square"):
        final_average_accuracy([[0.5, None]])
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):
        final_average_accuracy([[0.5, None], [1.5, 0.2]])
