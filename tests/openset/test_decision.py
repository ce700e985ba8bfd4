import numpy as np
import pytest

from spikgpt.openset.decision import (
    GATE_QUANTILE,
    adaptive_qvalues,
    bh_qvalues,
    calibration_statistic,
    check_false_unknown,
    check_fdr,
    decide,
    known_share,
    neglog_pvalues,
    parse_shift,
    reject,
    shift_correction,
    smallest_pvalue,
    unreachable_unknown,
)


def test_conformal_pvalues_are_uniform_for_exchangeable_cells_and_tail_goes_below_one_over_n():
    rng = np.random.default_rng(0)
    # valid marginally, over calibration draws (one calibration set can be off by ~sqrt(level / n))
    p = np.concatenate(
        [np.exp(-neglog_pvalues(rng.gamma(2.0, 1.0, 2000), rng.gamma(2.0, 1.0, 300))) for _ in range(40)]
    )
    for level in (0.01, 0.05, 0.1, 0.5):
        assert (p <= level).mean() <= level * 1.1 + 0.001, level
        assert (p <= level).mean() >= level * 0.8, level  # and not needlessly conservative
    cal = rng.gamma(2.0, 1.0, 300)
    far = np.exp(-neglog_pvalues(np.array([cal.max() * 3]), cal))
    assert far[0] < 1 / 301  # the exponential tail resolves beyond the calibration cells


def test_no_tail_is_fitted_to_fewer_than_five_cells():
    from spikgpt.openset.decision import MIN_TAIL_CELLS

    rng = np.random.default_rng(1)
    small, enough = rng.gamma(2.0, 1.0, 20), rng.gamma(2.0, 1.0, 21)  # tails of 4 and 5 cells
    assert MIN_TAIL_CELLS == 5
    far = np.array([100.0])
    assert np.exp(-neglog_pvalues(far, small))[0] == pytest.approx(1 / 21)  # plainly conformal
    assert np.exp(-neglog_pvalues(far, enough))[0] < 1e-6


def test_bh_qvalues_match_the_step_up_rule():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=500) ** 2
    q = bh_qvalues(p)
    for fdr in (0.05, 0.1, 0.2):
        order = np.sort(p)
        passed = np.flatnonzero(order <= fdr * np.arange(1, 501) / 500)
        expected = 0 if len(passed) == 0 else passed.max() + 1
        assert (q <= fdr).sum() == expected


def exchangeable_draw(rng: np.random.Generator) -> tuple[dict, dict]:
    """Two scores of 200 calibration cells and of a query: 450 known cells like them, then 50 shifted ones."""
    cal = {"a": rng.normal(size=200), "b": rng.exponential(size=200)}
    known = {"a": rng.normal(size=450), "b": rng.exponential(size=450)}
    new = {"a": rng.normal(4.0, 1.0, 50), "b": rng.exponential(size=50) + 3.0}
    return cal, {k: np.concatenate([known[k], new[k]]) for k in cal}


@pytest.mark.parametrize("fdr", [0.05, 0.1, 0.2])
def test_fdr_is_controlled_over_repeated_draws(fdr):
    """Known cells exchangeable with the calibration cells, unseen cells shifted: mean FDP <= fdr."""
    rng = np.random.default_rng(2)
    fdps, powers = [], []
    for _ in range(200):
        cal, q = exchangeable_draw(rng)
        d = decide(q, cal, ("a", "b"), fdr=fdr, shift="none")
        called = d.unknown
        fdps.append(called[:450].sum() / max(called.sum(), 1))
        powers.append(called[450:].mean())
    assert np.mean(fdps) <= fdr * 1.15 + 0.005  # BH: E[FDP] <= fdr · share of known cells
    assert np.mean(powers) > 0.5


@pytest.mark.parametrize("level", [0.01, 0.05])
def test_false_unknown_rate_is_controlled_per_cell_over_repeated_draws(level):
    """false_unknown=α: the share of known cells called Unknown is ≤ α (marginally over calibration sets)."""
    rng = np.random.default_rng(6)
    rates, powers = [], []
    for _ in range(200):
        cal, q = exchangeable_draw(rng)
        d = decide(q, cal, ("a", "b"), shift="none", false_unknown=level)
        assert (d.unknown == (d.pvalue <= level)).all()
        rates.append(d.unknown[:450].mean())
        powers.append(d.unknown[450:].mean())
    assert np.mean(rates) <= level * 1.15 + 0.002
    assert np.mean(rates) >= level * 0.5  # and not needlessly conservative
    assert np.mean(powers) > 0.5


def test_a_few_new_cells_in_a_large_query_per_cell_rule_calls_them_where_fdr_cannot():
    rng = np.random.default_rng(7)
    cal = {"a": rng.normal(size=1000)}  # one calibration set: its known-cell rate varies by ~sqrt(α / n)
    q = {"a": np.concatenate([rng.normal(size=5000), [3.6, 3.8, 4.0]])}  # 3 new cells, moderately far
    by_fdr = decide(q, cal, ("a",), fdr=0.1, shift="none")
    by_cell = decide(q, cal, ("a",), fdr=0.1, shift="none", false_unknown=0.01)
    assert not by_fdr.unknown[-3:].any() and by_cell.unknown[-3:].all()
    assert by_cell.unknown[:-3].mean() <= 0.02
    np.testing.assert_array_equal(by_fdr.pvalue, by_cell.pvalue)  # same test, another threshold
    with pytest.raises(ValueError, match="false_unknown must be in"):
        decide(q, cal, ("a",), false_unknown=1.0)
    check_false_unknown(0.0)


def test_three_far_cells_are_rejected_and_nothing_else():
    rng = np.random.default_rng(3)
    cal = {"a": rng.normal(size=300)}
    q = {"a": np.concatenate([rng.normal(size=997), [12.0, 13.0, 14.0]])}
    d = decide(q, cal, ("a",), fdr=0.1)
    assert d.unknown[-3:].all() and d.unknown[:-3].sum() <= 2
    assert set(d.reason) == {"a"}


def test_a_query_shifted_as_a_whole_is_not_called_unknown():
    rng = np.random.default_rng(4)
    cal = {"a": rng.gamma(2.0, 1.0, 300)}
    shifted = rng.gamma(2.0, 1.0, 1000) * 2.5 + 6.0  # every cell far from the calibration cells
    assert decide({"a": shifted}, cal, ("a",), fdr=0.1, shift="none").unknown.mean() > 0.9
    d = decide({"a": shifted}, cal, ("a",), fdr=0.1)
    assert d.unknown.mean() <= 0.05 and d.shift["location"] > 0
    # with a far group inside the shifted query, the group still stands out
    with_group = np.concatenate([shifted, rng.gamma(2.0, 1.0, 30) * 2.5 + 60.0])
    d = decide({"a": with_group}, cal, ("a",), fdr=0.1)
    assert d.unknown[-30:].mean() >= 0.9 and d.unknown[:-30].mean() <= 0.05
    # withheld (how cross-fitted models decide): no call once the correction ran, the same p-values
    kept = decide({"a": with_group}, cal, ("a",), fdr=0.1, withhold_under_shift=True)
    assert not kept.unknown.any() and kept.withheld == d.unknown.sum() >= 27
    assert np.array_equal(kept.pvalue, d.pvalue) and np.array_equal(kept.qvalue, d.qvalue)
    # and without a shift nothing is withheld
    plain = {"a": np.concatenate([rng.gamma(2.0, 1.0, 1000), [60.0, 61.0, 62.0]])}
    same = decide(plain, cal, ("a",), fdr=0.1, withhold_under_shift=True)
    assert same.shift["location"] == 0 and same.withheld == 0
    assert np.array_equal(same.unknown, decide(plain, cal, ("a",), fdr=0.1).unknown) and same.unknown[-3:].all()


def test_untested_cells_are_never_called_and_the_others_keep_their_evidence():
    """Cells predicted as a type without calibration cells get p = 1; the rest are decided as before."""
    rng = np.random.default_rng(8)
    cal = {"a": rng.gamma(2.0, 1.0, 300)}
    query = {"a": np.concatenate([rng.gamma(2.0, 1.0, 500), np.full(5, 40.0), np.full(5, 45.0)])}
    untested = np.zeros(510, bool)
    untested[-5:] = True  # five far cells of an uncalibrated type, five far cells of a new one
    plain = decide(query, cal, ("a",), fdr=0.1)
    d = decide(query, cal, ("a",), fdr=0.1, untested=untested)
    assert plain.unknown[-10:].all()
    assert not d.unknown[-5:].any() and (d.pvalue[-5:] == 1).all() and (d.reason[-5:] == "uncalibrated_type").all()
    assert d.unknown[-10:-5].all() and np.array_equal(d.pvalue[:-5], plain.pvalue[:-5])
    assert not (d.reason[:-5] == "uncalibrated_type").any()
    np.testing.assert_array_equal(d.unknown, plain.unknown & ~untested)


def test_a_shift_that_differs_between_types_is_removed_type_by_type():
    """Two of three types moved far, with ties at the calibration grid's top (the CellBench seed-3 shape)."""
    rng = np.random.default_rng(6)
    types = np.repeat([0, 1, 2], [80, 65, 66])
    moved = 2.8 + rng.exponential(4.0, len(types)) * (rng.uniform(size=len(types)) > 0.3)
    L = np.where(types < 2, moved, rng.exponential(1.2, len(types)) + 0.6)

    def unknown(L, mode, groups):
        corrected, info = shift_correction(L, mode, None, groups)
        return bh_qvalues(np.exp(-corrected)) <= 0.1, info

    one, info = unknown(L, "gated", types)
    assert one.mean() > 0.1 and info["location"] > 1  # one correction for the query: the far tails stay
    by_type, info = unknown(L, "gated_by_type", types)
    assert by_type.mean() <= 0.02 and info["types_corrected"] == 3
    assert (unknown(L, "gated_by_type", None)[0] == one).all()  # without types it is "gated"
    # a far group predicted as a type whose own cells are the majority still stands out
    with_group, _ = unknown(np.concatenate([L, rng.exponential(size=10) + 60]), "gated_by_type", np.r_[types, [1] * 10])
    assert with_group[-10:].all() and with_group[:-10].mean() <= 0.02
    # no shift of the query as a whole: nothing is corrected, a new type that fills its type stays Unknown
    L = np.concatenate([rng.exponential(size=600), rng.exponential(size=40) + 20])
    groups = np.r_[[0] * 300, [1] * 300, [2] * 40]
    by_type, info = unknown(L, "gated_by_type", groups)
    assert info["types_corrected"] == 0 and by_type[-40:].all() and (by_type == unknown(L, "gated", groups)[0]).all()
    # decide() passes the predicted types through
    cal = {"a": rng.exponential(size=300)}
    d = decide({"a": L}, cal, ("a",), fdr=0.1, shift="gated_by_type", groups=groups)
    assert d.shift["types_corrected"] == 0 and d.unknown[-40:].all()


def test_shift_is_estimated_on_matched_cells_only():
    rng = np.random.default_rng(5)
    L = np.concatenate([rng.exponential(size=300), rng.exponential(size=700) + 10])  # 70 % new, no shift
    matched = np.zeros(1000, bool)
    matched[:300] = True
    unmatched_estimate, info = shift_correction(L, "scale")
    assert info["location"] > 5  # taken over by the large new group
    corrected, info = shift_correction(L, "scale", matched)
    assert info["location"] < 0.3 and (corrected[300:] > 8).all()
    # decide() uses the matched cells only when asked to ("MODE@matched")
    cal = {"a": rng.exponential(size=300)}
    scores = {"a": np.concatenate([rng.exponential(size=300), rng.exponential(size=700) + 10])}
    on_all = decide(scores, cal, ("a",), fdr=0.1, shift="scale", null_cells=matched)
    on_matched = decide(scores, cal, ("a",), fdr=0.1, shift="scale@matched", null_cells=matched)
    assert on_all.shift["location"] > 5 and on_matched.shift["location"] < 0.5
    assert on_matched.unknown[300:].mean() > 0.9 > 0.1 > on_all.unknown[300:].mean()
    assert parse_shift("gated@matched") == ("gated", True) and parse_shift("none") == ("none", False)
    for bad in ("scale@all", "median", "scale@"):
        with pytest.raises(ValueError, match="@matched"):
            parse_shift(bad)


def test_calibration_statistic_and_errors():
    cal = {"a": np.arange(50.0), "b": np.arange(50.0)[::-1]}
    stat = calibration_statistic(cal, ("a", "b"))
    assert stat.shape == (50,) and np.isfinite(stat).all()
    with pytest.raises(ValueError, match="fdr must be in"):
        check_fdr(1.0)
    assert list(reject(np.array(["x", "y"]), np.array([True, False]))) == ["Unknown", "y"]


def test_too_few_calibration_cells_are_named_with_the_number_of_cells_an_unknown_call_needs():
    rng = np.random.default_rng(0)
    big = {"a": rng.gamma(2.0, 1.0, 100), "b": rng.gamma(2.0, 1.0, 100)}
    assert smallest_pvalue(big, ("a", "b")) == 0.0  # fitted tails have no floor
    assert unreachable_unknown(0.0, 100, 300, 0.1) == ""
    cal = {"s": rng.gamma(2.0, 1.0, 12)}
    # a cell beyond every calibration cell ties with the most extreme one: 2 / 13, not 1 / 13
    assert smallest_pvalue(cal, ("s",)) == pytest.approx(2 / 13)
    why = unreachable_unknown(2 / 13, 12, 200, 0.1)
    need = int(why.split("at least ")[1].split(" of the")[0])
    assert need == 308 and "false_unknown >= 0.154" in why and "calibration_folds=5" in why  # > 200: never
    why = unreachable_unknown(2 / 13, 12, 200, 0.5)
    need = int(why.split("at least ")[1].split(" of the")[0])
    assert need == 62  # ceil(200 · 2 / 13 / 0.5)
    for beyond, called in ((need - 1, 0), (need, need)):  # the number stated is the one that holds
        query = {"s": np.concatenate([np.full(beyond, 100.0), rng.gamma(2.0, 1.0, 200 - beyond) / 10])}
        assert decide(query, cal, ("s",), fdr=0.5, shift="none").unknown.sum() == called
    assert "calls no cell" in unreachable_unknown(2 / 13, 12, 200, 0.1, false_unknown=0.05)
    assert unreachable_unknown(2 / 13, 12, 200, 0.1, false_unknown=0.2) == ""


def test_a_group_too_weak_cell_by_cell_is_called_through_its_neighbourhood():
    from spikgpt.openset.decision import MAX_NEIGHBOURHOOD_CELLS, NEIGHBOURS

    rng = np.random.default_rng(0)
    cal = {"s": rng.gamma(2.0, 1.0, 200)}
    cal_pos = rng.normal(0, 1, (200, 5))
    # 10 new cells together, each only as unusual as the top 2 % of known cells: one by one,
    # Benjamini–Hochberg over 310 cells would need p <= 0.0032 for all ten
    scores = {"s": np.concatenate([rng.gamma(2.0, 1.0, 300), np.full(10, np.quantile(cal["s"], 0.98))])}
    pos = np.concatenate([rng.normal(0, 1, (300, 5)), rng.normal(8, 0.3, (10, 5))])
    alone = decide(scores, cal, ("s",), fdr=0.1, shift="none")
    assert alone.unknown.sum() == 0 and alone.pvalue[300:].min() > 0.01
    together = decide(scores, cal, ("s",), fdr=0.1, shift="none", positions=[(pos, cal_pos)])
    assert together.unknown[300:].all() and together.unknown[:300].sum() <= 1
    assert set(together.reason[300:]) == {"neighbourhood"}
    # the two p-values merged by Simes (0.23): min(2 · min, max), never above Bonferroni's 2 · min
    from spikgpt.openset.decision import neighbourhood_pvalues

    p_nb = neighbourhood_pvalues(-np.log(alone.pvalue), pos, cal_pos)
    pair = np.stack([alone.pvalue, p_nb])
    np.testing.assert_allclose(together.pvalue, np.minimum(np.minimum(1, 2 * pair.min(0)), pair.max(0)))
    assert (together.pvalue < np.minimum(1, 2 * pair.min(0))).any()
    # known cells keep valid p-values (each test valid, Simes over the two)
    assert (together.pvalue[:300] <= 0.05).mean() <= 0.07
    assert NEIGHBOURS == 10 and MAX_NEIGHBOURHOOD_CELLS == 20_000
    small = decide({"s": scores["s"][:NEIGHBOURS]}, cal, ("s",), shift="none", positions=[(pos[:NEIGHBOURS], cal_pos)])
    np.testing.assert_array_equal(
        small.pvalue, decide({"s": scores["s"][:NEIGHBOURS]}, cal, ("s",), shift="none").pvalue
    )


def test_fold_neighbourhoods_are_a_cross_conformal_mean_and_keep_the_group_call():
    """A cross-fitted model's neighbourhood test: each fold's calibration cells in that fold's embedding."""
    from spikgpt.openset.decision import (
        fold_neighbourhood_pvalues,
        neighbourhood_pvalues,
        neighbourhoods_tested,
    )

    rng = np.random.default_rng(1)
    cal = {"s": rng.gamma(2.0, 1.0, 200)}
    scores = {"s": np.concatenate([rng.gamma(2.0, 1.0, 300), np.full(10, np.quantile(cal["s"], 0.98))])}
    L = rng.exponential(1.0, 310)
    # five folds of 40 calibration cells, each fold's query positions a different rotation of the same cells
    pos = np.concatenate([rng.normal(0, 1, (300, 5)), rng.normal(8, 0.3, (10, 5))])
    folds = []
    for j in range(5):
        R = np.linalg.qr(np.random.default_rng(j).normal(size=(5, 5)))[0]
        folds.append((pos @ R, rng.normal(0, 1, (40 + j, 5)) @ R))
    one = fold_neighbourhood_pvalues(L, folds[:1])
    np.testing.assert_allclose(one, neighbourhood_pvalues(L, *folds[0]))
    weights = np.array([40 + j for j in range(5)], dtype=float)
    expected = sum(w * neighbourhood_pvalues(L, *f) for w, f in zip(weights, folds, strict=True)) / weights.sum()
    np.testing.assert_allclose(fold_neighbourhood_pvalues(L, folds), expected)
    together = decide(scores, cal, ("s",), fdr=0.1, shift="none", positions=folds)
    assert together.unknown[300:].all() and together.unknown[:300].sum() <= 1
    # no test where a fold has too few positions for a tail (< 21: MIN_TAIL_CELLS at 20 %): it could call nothing
    assert neighbourhoods_tested([40] * 5) and not neighbourhoods_tested([40, 40, 20]) and not neighbourhoods_tested([])
    short = [(q, c[:20]) for q, c in folds]
    np.testing.assert_array_equal(
        decide(scores, cal, ("s",), shift="none", positions=short).pvalue,
        decide(scores, cal, ("s",), shift="none").pvalue,
    )


def test_the_neighbourhood_test_shows_a_bar_over_folds_only_when_asked(monkeypatch):
    import io
    import sys

    from spikgpt.openset.decision import fold_neighbourhood_pvalues

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    rng = np.random.default_rng(2)
    folds = [(rng.normal(size=(60, 4)), rng.normal(size=(30, 4))) for _ in range(3)]
    L = rng.exponential(1.0, 60)
    shown = {}
    for progress in (False, True):
        monkeypatch.setattr(sys, "stderr", Terminal())
        p = fold_neighbourhood_pvalues(L, folds, progress=progress)
        shown[progress] = sys.stderr.getvalue()
        np.testing.assert_array_equal(p, fold_neighbourhood_pvalues(L, folds))  # the bar changes nothing
    assert "neighbourhood test" in shown[True] and "fold" in shown[True]
    assert shown[False] == ""


def test_the_gate_decides_when_a_moderate_shift_is_corrected():
    rng = np.random.default_rng(8)
    L = rng.exponential(size=2000) + 0.7  # median −log p ~0.7 above the null's log 2
    excess = np.median(L) - np.log(2)
    assert 0.5 < excess < 1.0
    _, high = shift_correction(L, "gated", gate=1.0)
    corrected, low = shift_correction(L, "gated", gate=0.5)
    assert high["location"] == 0 and low["location"] == pytest.approx(excess)
    assert (corrected <= L).all() and np.median(corrected) == pytest.approx(np.log(2))
    assert shift_correction(L, "gated")[1] == low
    # the default gate is 0.25 (0.12: 0.5, 0.11: 1): a rise of ~0.35 is corrected, one of ~0.15 is not
    for rise, fires in ((0.35, True), (0.15, False)):
        M = rng.exponential(size=2000) + rise
        assert (shift_correction(M, "gated")[1]["location"] > 0) is fires
        assert shift_correction(M, "gated", gate=0.5)[1]["location"] == 0


def test_a_low_gate_quantile_tells_a_new_group_from_a_global_shift():
    rng = np.random.default_rng(9)
    known = rng.exponential(size=1200)
    # no shift, a third of the query new (far): the median rises, the 10 % quantile hardly
    grouped = np.concatenate([known, rng.exponential(size=600) + 15])
    assert shift_correction(grouped, "gated", gate=0.25)[1]["location"] > 0
    assert shift_correction(grouped, "gated", gate=0.25, gate_quantile=0.1)[1]["location"] == 0
    # every cell shifted by 0.6: both quantiles fire, and correct the same way (location from the median)
    shifted = known + 0.6
    by_median = shift_correction(shifted, "gated", gate=0.25)
    by_q10 = shift_correction(shifted, "gated", gate=0.25, gate_quantile=0.1)
    assert by_median[1]["location"] > 0.4 and by_q10[1] == by_median[1]
    np.testing.assert_array_equal(by_q10[0], by_median[0])
    # the default is the median (GATE_QUANTILE 0.5: measured, the lower quantiles not chosen)
    assert GATE_QUANTILE == 0.5
    assert (
        shift_correction(grouped, "gated", gate=0.25)[1]
        == shift_correction(grouped, "gated", gate=0.25, gate_quantile=0.5)[1]
    )


def test_adaptive_qvalues_spend_the_fdr_that_benjamini_hochberg_leaves_unused():
    rng = np.random.default_rng(0)
    new = np.r_[np.zeros(600, bool), np.ones(400, bool)]  # 40 % new cells
    fdps, gained = [], []
    for _ in range(200):
        p = np.concatenate([rng.uniform(size=600), rng.beta(0.1, 8, size=400)])
        q_bh, q = bh_qvalues(p), adaptive_qvalues(p)
        assert (q <= q_bh).all()  # never fewer calls
        called = q <= 0.1
        fdps.append((called & ~new).sum() / max(called.sum(), 1))
        gained.append(called.sum() - (q_bh <= 0.1).sum())
    assert np.mean(fdps) <= 0.11 and np.mean(gained) > 10
    # (almost) no new cells: the known share is estimated at about 1, and decide uses these q-values
    p = rng.uniform(size=2000)
    assert 0.9 < known_share(p) <= 1.0 and known_share(np.ones(5)) == 1.0 and known_share(np.zeros(0)) == 1.0
    cal = {"s": rng.exponential(size=500)}
    d = decide(
        {"s": np.concatenate([rng.exponential(size=300), rng.exponential(size=200) + 8])}, cal, ("s",), shift="none"
    )
    np.testing.assert_allclose(d.qvalue, adaptive_qvalues(d.pvalue))


def test_the_neighbourhood_null_leaves_out_cells_unknown_on_their_own(monkeypatch):
    """A calibration cell placed beside a new group borrows its scores; the null is formed without them."""
    import spikgpt.openset.decision as decision

    rng = np.random.default_rng(3)
    cal = {"s": rng.gamma(2.0, 1.0, 200)}
    # 12 of 200 calibration cells sit where the new group lands: their query neighbourhoods are the group's
    cal_pos = np.concatenate([rng.normal(0, 1, (188, 5)), rng.normal(8, 0.3, (12, 5))])
    # 12 new cells together: 9 beyond every calibration cell (Unknown on their own), 3 only in the top 2 %
    group = np.r_[np.full(9, cal["s"].max() * 3), np.full(3, np.quantile(cal["s"], 0.98))]
    scores = {"s": np.concatenate([rng.gamma(2.0, 1.0, 300), group])}
    pos = np.concatenate([rng.normal(0, 1, (300, 5)), rng.normal(8, 0.3, (12, 5))])
    weak = np.r_[np.zeros(309, bool), np.ones(3, bool)]
    runs = {}
    assert decision.NULL_WITHOUT_OWN_CALLS
    for without in (False, True):
        monkeypatch.setattr(decision, "NULL_WITHOUT_OWN_CALLS", without)
        runs[without] = decide(scores, cal, ("s",), fdr=0.1, shift="none", positions=[(pos, cal_pos)])
    before, now = runs[False], runs[True]
    assert before.unknown[300:309].all() and not before.unknown[weak].any()  # the null grew with the group
    assert now.unknown[300:].all() and now.unknown[:300].sum() <= 1
    assert (now.pvalue[weak] < before.pvalue[weak]).all() and set(now.reason[weak]) == {"neighbourhood"}
    # with no cell Unknown on its own the null is the same as before
    known = {"s": scores["s"][:300]}
    for without in (False, True):
        monkeypatch.setattr(decision, "NULL_WITHOUT_OWN_CALLS", without)
        runs[without] = decide(known, cal, ("s",), fdr=0.1, shift="none", positions=[(pos[:300], cal_pos)])
    np.testing.assert_array_equal(runs[False].pvalue, runs[True].pvalue)


def test_a_null_without_own_calls_keeps_the_fdr_over_repeated_draws(monkeypatch):
    import spikgpt.openset.decision as decision

    result = {}
    for without in (False, True):
        monkeypatch.setattr(decision, "NULL_WITHOUT_OWN_CALLS", without)
        fdps, found = [], []
        for seed in range(40):
            rng = np.random.default_rng(100 + seed)
            cal = {"s": rng.gamma(2.0, 1.0, 300)}
            cal_pos = np.concatenate([rng.normal(0, 1, (294, 5)), rng.normal(6, 0.5, (6, 5))])
            new = rng.gamma(2.0, 1.0, 20) + rng.uniform(2, 12)  # a group somewhat to far out
            scores = {"s": np.concatenate([rng.gamma(2.0, 1.0, 400), new])}
            pos = np.concatenate([rng.normal(0, 1, (400, 5)), rng.normal(6, 0.5, (20, 5))])
            called = decide(scores, cal, ("s",), fdr=0.1, shift="none", positions=[(pos, cal_pos)]).unknown
            fdps.append(called[:400].sum() / max(called.sum(), 1))
            found.append(called[400:].mean())
        result[without] = np.mean(fdps), np.mean(found)
    # measured: mean FDP 0.026 -> 0.046, share of the new cells called 0.47 -> 0.66
    assert result[True][0] <= 0.1 and result[True][1] >= result[False][1] + 0.1
