"""Properties of SER's selection rules (ser/selection.py, SER_METHOD.md §"The loop", step 2) on random rewards.

The pipeline under test is the one `ser evolve` runs (evolve.select_pseudo_labels):
p = σ((r - offset) / T) -> pair_status -> learning_status -> select, pseudo-labels from orient(p_a, p_b);
the SSRM baseline keeps max(P, 1 - P) >= threshold with P = σ((r_a - r_b) / T). Thresholds are drawn as a
validated config allows them: 0 <= tau_low <= tau_high <= 1, and tau_delta > 0.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ser.selection import (STATUS_1, STATUS_2, STATUS_ANY, STOP, T_MAX, T_MIN, fit_temperature, learning_status,
                           orient, pair_status, probabilities, resolve_min_pairs, select, sigmoid, ssrm_select)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # σ of |x| > 709 saturates: fine
FAST = settings(max_examples=150, deadline=None)

reward = st.floats(-60, 60, allow_nan=False)
rewards = st.lists(st.tuples(reward, reward), max_size=60).map(
    lambda xs: (np.array([a for a, _ in xs], dtype=np.float64), np.array([b for _, b in xs], dtype=np.float64)))
offset = st.floats(-10, 10, allow_nan=False)
temperature = st.floats(1e-3, 1e3)  # what fit_temperature gives for margins of ordinary size
min_pairs = st.integers(1, 70)


@st.composite
def thresholds(draw):
    low, high = sorted((draw(st.floats(0, 1)), draw(st.floats(0, 1))))
    return high, low, draw(st.floats(0, 1, exclude_min=True))


def pipeline(r_a, r_b, off, t, taus, n, rule):
    """evolve.select_pseudo_labels for the paper and code rules: (p_a, p_b, status, learning, mask, a_wins)."""
    p_a, p_b = probabilities(r_a, off, t), probabilities(r_b, off, t)
    status = pair_status(p_a, p_b, *taus)
    learning = learning_status(status, n, rule)
    return p_a, p_b, status, learning, select(status, learning), orient(p_a, p_b)


@FAST
@given(st.lists(reward, max_size=60), offset, temperature)
def test_probabilities_are_the_calibrated_sigmoid_and_monotone(r, off, t):
    p = probabilities(r, off, t)
    for x, px in zip(r, p):
        z = (x - off) / t
        expected = 1 / (1 + math.exp(-z)) if z > -700 else 0.0
        assert px == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert ((0 <= p) & (p <= 1)).all()
    order = np.argsort(r, kind="stable")  # non-decreasing in r (and not strictly, once σ saturates)
    assert (np.diff(p[order]) >= 0).all()


@FAST
@given(rewards, offset, temperature, thresholds(), min_pairs, st.sampled_from(["paper", "code"]))
def test_status_and_selection_follow_the_definitions(r, off, t, taus, n, rule):
    tau_high, tau_low, tau_delta = taus
    p_a, p_b, status, learning, mask, _ = pipeline(*r, off, t, taus, n, rule)
    for pa, pb, s in zip(p_a, p_b, status):
        one = (pa > tau_high and pb < tau_low) or (pb > tau_high and pa < tau_low)
        two = not one and abs(pa - pb) >= tau_delta
        assert s == (STATUS_1 if one else STATUS_2 if two else 0)
    n1, n2 = int((status == 1).sum()), int((status == 2).sum())
    if rule == "code":  # one pass, no N_min: every status-1 or status-2 pair
        assert learning == (STATUS_ANY if n1 + n2 else STOP)
        assert (mask == (status > 0)).all()
    else:  # status 1 by count, else status 2 by count, else stop
        assert learning == (STATUS_1 if n1 >= n else STATUS_2 if n2 >= n else STOP)
        assert (mask == ((status == learning) & (learning != STOP))).all()
        assert mask.sum() == 0 or mask.sum() >= n
    assert (status[mask] > 0).all()


@FAST
@given(rewards, offset, temperature, thresholds(), min_pairs, st.sampled_from(["paper", "code"]))
def test_pseudo_labels_agree_with_the_reward_sign(r, off, t, taus, n, rule):
    """σ is monotone, so p_a > p_b only if r_a > r_b. A selected pair has p_a != p_b (status 1: one p above
    tau_high >= tau_low > the other; status 2: |p_a - p_b| >= tau_delta > 0), so its pseudo-label is exactly
    the sign of r_a - r_b; a status-1 pair's chosen answer is the one above tau_high."""
    r_a, r_b = r
    p_a, p_b, status, _, mask, a_wins = pipeline(r_a, r_b, off, t, taus, n, rule)
    assert (r_a[a_wins] > r_b[a_wins]).all()
    assert (a_wins[mask] == (r_a[mask] > r_b[mask])).all()
    s1 = status == STATUS_1
    assert (a_wins[s1] == (p_a[s1] > taus[0])).all()


@FAST
@given(rewards, offset, temperature, thresholds(), min_pairs, st.sampled_from(["paper", "code"]))
def test_swapping_answers_swaps_pseudo_labels_only(r, off, t, taus, n, rule):
    r_a, r_b = r
    p_a, p_b, status, learning, mask, a_wins = pipeline(r_a, r_b, off, t, taus, n, rule)
    _, _, status_s, learning_s, mask_s, b_wins = pipeline(r_b, r_a, off, t, taus, n, rule)
    assert (status_s == status).all() and learning_s == learning and (mask_s == mask).all()
    assert (b_wins == (p_b > p_a)).all() and not (a_wins & b_wins).any()
    assert ((a_wins != b_wins) == (p_a != p_b)).all()  # equal p: no preference either way
    assert ((a_wins != b_wins) | ~mask).all()  # ... which never happens to a selected pair


@FAST
@given(rewards, offset, temperature, thresholds(), min_pairs, min_pairs)
def test_paper_rule_selects_a_subset_of_the_code_rule(r, off, t, taus, n, m):
    """code = every pair with status > 0; paper = the status-1 or the status-2 part of it, or nothing. They agree
    exactly when the paper rule's choice leaves nothing out: no status-2 pairs and enough status-1 pairs, no
    status-1 pairs and enough status-2 pairs, or no confident pair at all."""
    _, _, status, _, paper, _ = pipeline(*r, off, t, taus, n, "paper")
    code = pipeline(*r, off, t, taus, n, "code")[4]
    assert not (paper & ~code).any()
    n1, n2 = int((status == 1).sum()), int((status == 2).sum())
    agree = (n1 >= n and n2 == 0) or (n1 == 0 and n2 >= n) or n1 + n2 == 0
    assert (paper == code).all() == agree
    # a larger N_min only moves the learning status down the order status 1 -> status 2 -> stop
    rank = {STATUS_1: 2, STATUS_2: 1, STOP: 0}
    small, large = sorted((n, m))
    assert rank[learning_status(status, large)] <= rank[learning_status(status, small)]


dyadic = st.integers(-2**16, 2**16).map(lambda k: k / 1024)  # sums of these are exact in float64
dyadic_rewards = st.lists(st.tuples(dyadic, dyadic), max_size=60).map(
    lambda xs: (np.array([a for a, _ in xs], dtype=np.float64), np.array([b for _, b in xs], dtype=np.float64)))


@FAST
@given(dyadic_rewards, dyadic, dyadic, st.integers(-10, 10), temperature, thresholds(), min_pairs,
       st.sampled_from(["paper", "code"]))
def test_centred_calibration_is_shift_and_scale_invariant(r, off, shift, log2_scale, t, taus, n, rule):
    """The pairwise loss fixes rewards only up to r -> k r + c. With the offset centred on the same rewards
    (offset -> k offset + c) and the temperature fitted on their margins (T -> k T), p does not change, and
    neither does anything selected from it. (Dyadic values and k = 2^j make every step exact.)"""
    k = 2.0**log2_scale
    base = pipeline(*r, off, t, taus, n, rule)
    moved = pipeline(k * r[0] + shift, k * r[1] + shift, k * off + shift, k * t, taus, n, rule)
    for x, y in zip(base, moved):
        assert np.array_equal(x, y)
    assert (ssrm_select(*r, 0.8, t) == ssrm_select(k * r[0] + shift, k * r[1] + shift, 0.8, k * t)).all()


@FAST
@given(rewards, st.floats(110, 1e3), thresholds())
def test_uncalibrated_rule_selects_nothing_after_a_large_shift(r, shift, taus):
    """SER_METHOD.md's pitfall: with the paper's absolute thresholds (offset 0, T 1), shifting every reward by a
    constant, which the pairwise loss cannot see, changes the selection; from r - 60 > 50 on, σ(r) is 1.0 in
    float64 for every answer: nothing below tau_low and no gap >= tau_delta, so even the code rule stops.
    (With centring, the shift changes nothing: test_centred_calibration_is_shift_and_scale_invariant.)"""
    assert pipeline(r[0] + shift, r[1] + shift, 0.0, 1.0, taus, 1, "code")[3] == STOP


@FAST
@given(rewards, temperature, st.floats(0, 1.2))
def test_ssrm_keeps_pairs_by_pairwise_confidence(r, t, threshold):
    """max(P, 1-P) >= threshold with P = σ((r_a - r_b) / T) is |r_a - r_b| / T >= logit(threshold) for a
    threshold in (1/2, 1); checked away from the boundary and from thresholds within 1e-6 of 1/2 and 1, where
    float rounding of P decides."""
    r_a, r_b = r
    keep = ssrm_select(r_a, r_b, threshold, t)
    margin = np.abs(r_a - r_b) / t
    if threshold <= 0.5:  # max(P, 1 - P) >= 1/2 always
        assert keep.all()
    elif threshold > 1:
        assert not keep.any()
    else:
        assert not keep[r_a == r_b].any()  # P = 1/2: no preference
    if 0.5 + 1e-6 < threshold < 1 - 1e-6:
        cut = math.log(threshold / (1 - threshold))
        clear = np.abs(margin - cut) > 1e-6
        assert (keep[clear] == (margin[clear] >= cut)).all()
    clear = np.abs(sigmoid_confidence(r_a, r_b, t) - threshold) > 1e-12
    assert (ssrm_select(r_b, r_a, threshold, t)[clear] == keep[clear]).all()  # swapping answers: same pairs


@FAST
@given(rewards.filter(lambda r: len(r[0]) > 0), offset, temperature, st.data())
def test_thresholds_on_gap_and_confidence_are_inclusive(r, off, t, data):
    """SER's status 2 is |p_a - p_b| >= tau_delta and SSRM keeps max(P, 1-P) >= threshold: a pair exactly at
    the threshold counts (random floats never land there, so put the threshold on a drawn pair)."""
    r_a, r_b = r
    i = data.draw(st.integers(0, len(r_a) - 1))
    p_a, p_b = probabilities(r_a, off, t), probabilities(r_b, off, t)
    gap = abs(p_a[i] - p_b[i])
    if gap > 0:
        assert pair_status(p_a, p_b, 1.0, 0.0, gap)[i] == STATUS_2  # tau 1/0: status 1 is impossible
    p = sigmoid((r_a[i] - r_b[i]) / t)
    assert ssrm_select(r_a, r_b, max(p, 1 - p), t)[i]


def sigmoid_confidence(r_a, r_b, t):
    p = 1 / (1 + np.exp(-(r_a - r_b) / t))
    return np.maximum(p, 1 - p)


@FAST
@given(rewards, temperature, temperature, st.floats(0.5, 1), st.floats(0.5, 1))
def test_ssrm_is_monotone_in_threshold_and_temperature(r, t1, t2, th1, th2):
    """A higher threshold or a higher temperature (flatter P) keeps a subset: every step of P is monotone."""
    (t_lo, t_hi), (th_lo, th_hi) = sorted((t1, t2)), sorted((th1, th2))
    keep = ssrm_select(*r, th_lo, t_lo)
    assert not (ssrm_select(*r, th_hi, t_lo) & ~keep).any()
    assert not (ssrm_select(*r, th_lo, t_hi) & ~keep).any()


GRID_STEP = math.log(1e12) / 960  # fit_temperature's log-spaced grid from T_MIN = 1e-6 to T_MAX = 1e6


margin = st.one_of(st.just(0.0), st.floats(1e-2, 20), st.floats(-20, -1e-2))  # NLL differences resolvable


@FAST
@given(st.lists(margin, min_size=2, max_size=60).filter(any), st.floats(0.1, 10))
def test_fit_temperature_scales_with_the_margins(margins, k):
    """The NLL of σ(m / T) is convex in 1/T (strictly unless every margin is 0), so the grid's argmin is one of
    the two grid points around the true minimiser T*, and T* scales with the margins: fit(k m) is k fit(m)
    within two grid steps, as long as both lie inside the grid. With the smoothed target T* is finite exactly
    when the mean margin is > 0; with mean <= 0 it is infinite."""
    m = np.array(margins)
    t, tk = fit_temperature(m), fit_temperature(k * m)
    lo, hi = T_MIN * (1 - 1e-9), T_MAX * (1 + 1e-9)
    assert lo <= t <= hi and lo <= tk <= hi
    if m.mean() <= 0:
        assert t == pytest.approx(T_MAX)  # no better than chance: the flattest scale on the grid
    elif (m >= 0).all():
        # separable: T stays finite (unsmoothed it would be 0, the grid's floor). Each positive margin alone would
        # be fitted at σ(m / T) = (n+1)/(n+2), i.e. T = m / log(n+1); zero margins add a constant; the NLL's
        # derivative in 1/T is the sum of the single-pair ones, so T* lies between the smallest and largest of these
        pos = m[m > 0]
        lo_t, hi_t = pos.min() / math.log(len(m) + 1), pos.max() / math.log(len(m) + 1)
        lo_t, hi_t = min(max(lo_t, T_MIN), T_MAX), min(max(hi_t, T_MIN), T_MAX)  # the grid's range
        assert lo_t * math.exp(-2 * GRID_STEP) <= t <= hi_t * math.exp(2 * GRID_STEP)
    edge = (T_MIN * math.exp(GRID_STEP), T_MAX * math.exp(-GRID_STEP))
    if edge[0] < t < edge[1] and edge[0] < tk < edge[1]:
        assert abs(math.log(tk / (k * t))) <= 2 * GRID_STEP + 1e-9


@FAST
@given(st.floats(0, 1, exclude_min=True), st.integers(0, 10**6), st.integers(1, 10**6))
def test_min_pairs_fraction_or_count(frac, pool, count):
    n = resolve_min_pairs(frac, pool)
    assert 1 <= n <= max(pool, 1) and n >= frac * pool - 1e-9 and (n == 1 or n - 1 < frac * pool)
    assert resolve_min_pairs(count, pool) == count


def test_min_pairs_fraction_hand_values():
    # 0.07 * 100 and 0.14 * 100 are a hair above 7 and 14 in floats: rounding them up gave 8 and 15
    assert [resolve_min_pairs(f, 100) for f in (0.07, 0.14, 0.05, 0.051)] == [7, 14, 5, 6]
    assert resolve_min_pairs(0.05, 10) == 1 and resolve_min_pairs(0.001, 10) == 1
