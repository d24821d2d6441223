import math

import pytest

from lightning_synth.data.weighting import SyntheticWeighting, allocate_budget


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="`min_weight` must be a finite number >= 0"):
        SyntheticWeighting(min_weight=-0.1)
    with pytest.raises(ValueError, match="`max_weight` must be > 0 and >= `min_weight`"):
        SyntheticWeighting(min_weight=0.5, max_weight=0.4, base_weight=0.45)
    with pytest.raises(ValueError, match=r"`base_weight` must be in \[`min_weight`, `max_weight`\]"):
        SyntheticWeighting(base_weight=3.0, max_weight=2.0)
    with pytest.raises(ValueError, match="`patience` must be an int >= 0"):
        SyntheticWeighting(patience=-1)
    with pytest.raises(ValueError, match="`cooldown` must be an int >= 0"):
        SyntheticWeighting(cooldown=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`factor` must be in \(0, 1\)"):
        SyntheticWeighting(factor=1.0)
    with pytest.raises(ValueError, match="`threshold` must be a finite number >= 0"):
        SyntheticWeighting(threshold=math.nan)
    with pytest.raises(ValueError, match="`threshold_mode` must be 'rel' or 'abs'"):
        SyntheticWeighting(threshold_mode="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`quality_reference` must be a finite number > 0"):
        SyntheticWeighting(quality_reference=0.0)
    with pytest.raises(ValueError, match="`quality_power` must be a finite number >= 0"):
        SyntheticWeighting(quality_power=-1.0)
    weighting = SyntheticWeighting()
    with pytest.raises(ValueError, match=r"`quality` must be None or in \[0, 1\]"):
        weighting.update(1.0, 1.5, epoch=0)
    with pytest.raises(ValueError, match="`epoch` must be an int >= 0"):
        weighting.update(1.0, None, epoch=-1)
    with pytest.raises(ValueError, match="weighting state lacks"):
        weighting.load_state_dict({"weight": 1.0})

    with pytest.raises(ValueError, match="`total` must be >= 0"):
        allocate_budget(-1, {"a": 1.0})
    with pytest.raises(ValueError, match="`mass` must name at least one generator"):
        allocate_budget(10, {})
    with pytest.raises(ValueError, match="`mass` values must be finite and >= 0"):
        allocate_budget(10, {"a": -1.0})
    with pytest.raises(ValueError, match=r"`min_share` must be in \[0, 1/2\]"):
        allocate_budget(10, {"a": 1.0, "b": 1.0}, min_share=0.6)


def test_plateau_lowers_weight_after_patience():
    weighting = SyntheticWeighting(patience=2, factor=0.5, threshold=0.01)
    weights = [weighting.update(loss, None, epoch) for epoch, loss in enumerate([1.0, 0.995, 1.0, 0.999])]
    # 1.0 sets the best; 0.995 is within the 1% threshold, so three non-improving updates: the third cuts.
    assert weights == [1.0, 1.0, 1.0, 0.5]
    assert weighting.reason == "plateau"
    assert [row["reason"] for row in weighting.history] == ["unchanged"] * 3 + ["plateau"]
    # The counter restarts after a cut: patience again before the next one.
    assert [weighting.update(1.0, None, e) for e in range(4, 7)] == [0.5, 0.5, 0.25]


def test_cooldown_delays_counting():
    weighting = SyntheticWeighting(patience=0, factor=0.5, cooldown=2)
    weights = [weighting.update(1.0, None, epoch) for epoch in range(5)]
    assert weights == [1.0, 0.5, 0.5, 0.5, 0.25]


def test_progress_raises_weight_back_bounded():
    weighting = SyntheticWeighting(patience=0, factor=0.5, min_weight=0.1)
    for epoch in range(4):
        weighting.update(2.0, None, epoch)
    assert weighting.weight == 0.125
    weighting.update(1.0, None, 4)
    assert weighting.weight == 0.25 and weighting.reason == "progress"
    for epoch, loss in enumerate([0.5, 0.25, 0.1, 0.05], start=5):
        weighting.update(loss, None, epoch)
    assert weighting.weight == 1.0  # back to the base weight, not beyond
    assert weighting.history[-1]["reason"] == "unchanged"


def test_weight_respects_min_and_max():
    weighting = SyntheticWeighting(base_weight=0.5, patience=0, factor=0.1, min_weight=0.2, max_weight=0.8)
    for epoch in range(5):
        weighting.update(1.0, None, epoch)
    assert weighting.weight == pytest.approx(0.2)
    boosted = SyntheticWeighting(base_weight=1.0, max_weight=1.5, quality_reference=0.5)
    assert boosted.update(None, 1.0, epoch=0) == 1.5  # quality_scale 2, capped by max_weight
    assert boosted.update(None, 0.0, epoch=1) == 0.1  # quality 0, floored at min_weight


def test_quality_moves_weight():
    weighting = SyntheticWeighting()
    assert weighting.update(None, 0.9, epoch=0) == pytest.approx(0.9)
    assert weighting.update(None, 0.45, epoch=1) == pytest.approx(0.45)
    assert weighting.reason == "quality"
    assert weighting.update(None, 0.8, epoch=2) == pytest.approx(0.8)
    assert weighting.update(None, 0.8, epoch=3) == pytest.approx(0.8) and weighting.reason == "unchanged"
    ignored = SyntheticWeighting(quality_power=0.0)
    assert ignored.update(None, 0.1, epoch=0) == 1.0


def test_plateau_and_quality_combine():
    weighting = SyntheticWeighting(patience=0, factor=0.5)
    weighting.update(1.0, 1.0, epoch=0)
    assert weighting.update(1.0, 0.5, epoch=1) == pytest.approx(0.25)
    assert weighting.reason == "plateau+quality"


def test_none_and_nonfinite_signals_change_nothing():
    weighting = SyntheticWeighting(patience=0)
    assert weighting.update(None, None, epoch=0) == 1.0 and weighting.reason == "unchanged"
    weighting.update(1.0, None, epoch=1)
    with pytest.warns(UserWarning, match="ignoring non-finite synthetic loss"):
        assert weighting.update(math.nan, None, epoch=2) == 1.0


def test_allocate_budget_follows_mass_and_sums_to_total():
    assert allocate_budget(100, {"a": 1.0, "b": 3.0}, min_share=0.0) == {"a": 25, "b": 75}
    assert allocate_budget(0, {"a": 1.0, "b": 3.0}) == {"a": 0, "b": 0}
    assert allocate_budget(9, {"a": 0.0, "b": 0.0, "c": 0.0}) == {"a": 3, "b": 3, "c": 3}
    for total in (1, 7, 10, 33, 101, 1000):
        counts = allocate_budget(total, {"a": 0.3, "b": 0.2, "c": 0.5, "d": 0.01}, min_share=0.05)
        assert sum(counts.values()) == total
        assert all(isinstance(c, int) and c >= 0 for c in counts.values())
    counts = allocate_budget(1000, {"a": 0.3, "b": 0.2, "c": 0.5})
    assert counts["c"] > counts["a"] > counts["b"]


def test_allocate_budget_floor():
    counts = allocate_budget(100, {"a": 1.0, "b": 0.0, "c": 0.0}, min_share=0.1)
    assert counts == {"a": 80, "b": 10, "c": 10}
    for total in (10, 30, 70):
        counts = allocate_budget(total, {"a": 5.0, "b": 0.0, "c": 0.0}, min_share=0.1)
        assert min(counts.values()) >= math.floor(0.1 * total + 1e-9)
    assert allocate_budget(10, {"a": 1.0, "b": 0.0}, min_share=0.5) == {"a": 5, "b": 5}
