"""Losses and SER selection rules against hand-derived values."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from ser.losses import pairwise_loss, pairwise_losses
from ser.selection import (STATUS_1, STATUS_2, STATUS_ANY, STOP, fit_temperature, learning_status, orient,
                           pair_status, probabilities, resolve_min_pairs, select, ssrm_select)


def test_bradley_terry_loss_values():
    d = torch.tensor([0.0, math.log(3.0)])
    # -log σ(0) = log 2;  -log σ(log 3) = -log(3/4)
    assert torch.allclose(pairwise_losses(d), torch.tensor([math.log(2.0), -math.log(0.75)]), atol=1e-6)
    # with a margin m the loss is -log σ(d - m): at d = m it is log 2
    assert pairwise_losses(torch.tensor([1.0]), "sigmoid", 1.0).item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert pairwise_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(
        (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2, abs=1e-6)


def test_hinge_loss_values():
    d = torch.tensor([0.25, 2.0, -1.0])
    assert torch.allclose(pairwise_losses(d, "hinge", 1.0), torch.tensor([0.75, 0.0, 2.0]))


def test_pair_status_hand_derived():
    p_a = np.array([0.6, 0.5, 0.9, 0.55, 0.3, 0.2])
    p_b = np.array([0.4, 0.1, 0.8, 0.44, 0.6, 0.55])
    # 0: 0.6>0.55 and 0.4<0.45 -> 1.  1: not 1 (0.5 is not >0.55), |Δ|=0.4 -> 2.  2: |Δ|=0.1 -> 0.
    # 3: 0.55 is not > 0.55 (strict), |Δ|=0.11 -> 0.  4: mirrored status 1.  5: 0.55 not > 0.55, |Δ|=0.35 -> 2.
    assert pair_status(p_a, p_b).tolist() == [1, 2, 0, 0, 1, 2]


def test_pair_status_tie_at_delta_threshold_counts():
    # |0.75 - 0.5| == 0.25 exactly (binary-exact values): the paper's rule is >=, so it is status 2
    assert pair_status([0.75], [0.5], tau_high=0.9, tau_low=0.1, tau_delta=0.25).tolist() == [2]
    assert pair_status([0.75], [0.5], tau_high=0.9, tau_low=0.1, tau_delta=0.2500001).tolist() == [0]


def test_learning_status_switch_by_count_and_stop():
    status = np.array([1, 2, 0, 0, 1, 2])
    assert learning_status(status, 2) == STATUS_1
    assert learning_status(status, 3) == STOP  # 2 status-1 and 2 status-2 pairs, need 3
    assert learning_status(np.array([1, 2, 2, 2]), 3) == STATUS_2  # too few status-1: switch to status 2
    assert learning_status(np.array([], dtype=int), 1) == STOP  # empty pool
    assert learning_status(status, 100, rule="code") == STATUS_ANY  # the released code has no N_min
    assert learning_status(np.array([0, 0]), 1, rule="code") == STOP


def test_select_and_orient():
    status = np.array([1, 2, 0, 1])
    assert select(status, STATUS_1).tolist() == [True, False, False, True]
    assert select(status, STATUS_2).tolist() == [False, True, False, False]
    assert select(status, STATUS_ANY).tolist() == [True, True, False, True]
    assert select(status, STOP).tolist() == [False] * 4
    assert orient([0.7, 0.2], [0.3, 0.9]).tolist() == [True, False]


def test_min_pairs_count_or_fraction():
    assert resolve_min_pairs(600, 10) == 600
    assert resolve_min_pairs(0.05, 1000) == 50
    assert resolve_min_pairs(0.05, 1001) == 51  # ceil
    assert resolve_min_pairs(0.05, 1) == 1


def test_calibrated_probabilities():
    # centring on the labelled mean: r = offset gives exactly 0.5; T scales the distance
    assert probabilities([2.0], offset=2.0).tolist() == [0.5]
    assert probabilities([3.0], offset=1.0, temperature=2.0)[0] == pytest.approx(1 / (1 + math.exp(-1)))


def test_fit_temperature_recovers_calibrated_scale():
    # 3 pairs at margin +2, 1 at -2, smoothed target t = 5/6: the NLL is
    # -(3t + 1 - t) log σ(x) - (3 - 3t + t) log σ(-x) with x = 2/T, minimal where σ(x) = (1 + 2t) / 4 = 2/3,
    # i.e. T = 2 / log 2
    assert fit_temperature([2.0, 2.0, 2.0, -2.0]) == pytest.approx(2 / math.log(2), rel=0.03)
    # separable: 4 pairs at +2, t = 5/6 -> σ(2/T) = 5/6, T = 2 / log 5 (without smoothing: the grid's floor)
    assert fit_temperature([2.0] * 4) == pytest.approx(2 / math.log(5), rel=0.03)
    # no better than chance (mean margin <= 0; all zero: a collapsed RM): the flattest T, never the sharpest, which
    # would make every pool vote look certain
    flattest = np.exp(math.log(1e6))  # the grid's last point
    assert fit_temperature([0.0] * 4) == fit_temperature([1e-9, -1e-9]) == fit_temperature([1.0, -3.0]) == flattest
    # a weak RM's margins in ten-thousandths (or a loud one's in thousands) are fitted to the same σ: T scales with
    # them (a grid floored at 1e-3 gave 1e-3, σ(2e-4 / 1e-3) = 0.55 in place of 5/6)
    assert fit_temperature([2e-4] * 4) == pytest.approx(2e-4 / math.log(5), rel=0.03)
    assert fit_temperature([2e3] * 4) == pytest.approx(2e3 / math.log(5), rel=0.03)


def test_ssrm_threshold():
    d = math.log(4.0)  # σ(log 4) = 0.8 exactly in reals
    keep = ssrm_select([d + 1e-6, d - 1e-3, -d - 1e-6, 0.0], [0.0, 0.0, 0.0, 0.0], 0.8)
    assert keep.tolist() == [True, False, True, False]
    # with SER's fitted temperature T the margin is divided by T: 0.01 / 0.005 = 2 -> σ(2) = 0.88 >= 0.8
    assert ssrm_select([0.01, 0.005], [0.0, 0.0], 0.8, temperature=0.005).tolist() == [True, False]
    assert not ssrm_select([0.01], [0.0], 0.8).any()  # raw scale: σ(0.01) = 0.5025


probs = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@given(st.lists(st.tuples(probs, probs), max_size=50))
def test_status_properties(pairs):
    p_a = np.array([a for a, _ in pairs])
    p_b = np.array([b for _, b in pairs])
    s = pair_status(p_a, p_b)
    # symmetric in the two answers, and status-1 pairs are always oriented the same way as their p's
    assert (pair_status(p_b, p_a) == s).all()
    s1 = s == 1
    assert ((p_a[s1] > 0.55) != (p_b[s1] > 0.55)).all()
    assert (np.abs(p_a[s == 2] - p_b[s == 2]) >= 0.30).all()
    for n in (1, 5):
        mask = select(s, learning_status(s, n))
        assert mask.sum() == 0 or mask.sum() >= n
