"""ACC / NMI / ARI against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cpp.metrics import ari, clustering_accuracy, evaluate, nmi


def test_perfect_clustering_up_to_relabelling() -> None:
    y = [0, 0, 1, 1, 2, 2]
    p = [5, 5, 3, 3, 9, 9]
    assert evaluate(y, p) == {"acc": 1.0, "nmi": 1.0, "ari": 1.0}


def test_accuracy_uses_best_one_to_one_map() -> None:
    # Contingency [[2, 1], [0, 3]]: best map gives 2 + 3 = 5 of 6.
    y = [0, 0, 0, 1, 1, 1]
    p = [1, 1, 0, 0, 0, 0]
    assert clustering_accuracy(y, p) == pytest.approx(5 / 6)


def test_nmi_hand_computed() -> None:
    # y = [0,0,1,1], p = [0,0,0,1]: H(Y)=ln2, H(P)=H(3/4,1/4), I = H(Y) - H(Y|P) with H(Y|P) = 3/4·H(2/3,1/3).
    y, p = [0, 0, 1, 1], [0, 0, 0, 1]

    def h(*ps: float) -> float:
        return -sum(q * math.log(q) for q in ps)

    mi = h(0.5, 0.5) - 0.75 * h(2 / 3, 1 / 3)
    expected = mi / (0.5 * (h(0.5, 0.5) + h(0.75, 0.25)))
    assert nmi(y, p) == pytest.approx(expected)


def test_ari_hand_computed() -> None:
    # Same case: index = C(2,2) = 1; rows: 1 + 1 = 2; cols: C(3,2) = 3; pairs total C(4,2) = 6.
    expected_index = 2 * 3 / 6
    expected = (1 - expected_index) / (0.5 * (2 + 3) - expected_index)
    assert ari([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(expected)


def test_independent_labels_score_low() -> None:
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 5000), rng.integers(0, 5, 5000)
    scores = evaluate(y, p)
    assert scores["nmi"] < 0.01
    assert abs(scores["ari"]) < 0.01
    assert scores["acc"] < 0.25


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        clustering_accuracy([0, 1], [0])
