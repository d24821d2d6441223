import pytest
from pydantic import ValidationError

from lightning_synth.profile import Weakness, WeaknessProfile


def _profile(epoch=0):
    return WeaknessProfile(epoch=epoch, clean_error=0.1, num_samples=100, frontier={"rotation": 2.5}, weaknesses=[
        Weakness(kind="class", name="6", error_rate=0.3, gap=0.2, support=10, target=6),
        Weakness(kind="perturbation", name="rotation", severity=3, error_rate=0.5, gap=0.4, support=64),
        Weakness(kind="perturbation", name="rotation", severity=1, error_rate=0.2, gap=0.1, support=64),
        Weakness(kind="confusion", name="6->0", error_rate=0.15, gap=0.15, support=10, target=6, other=0),
        Weakness(kind="slice", name="group=1", error_rate=0.35, gap=0.25, support=20, target=1),
    ])


def test_bad_arguments_raise():
    with pytest.raises(ValidationError, match="kind"):
        Weakness(kind="colour", name="x", error_rate=0.1, gap=0.1, support=1)
    with pytest.raises(ValidationError, match="error_rate"):
        Weakness(kind="class", name="x", error_rate=1.5, gap=0.1, support=1)
    with pytest.raises(ValidationError, match="support"):
        Weakness(kind="class", name="x", error_rate=0.5, gap=0.1, support=-1)
    with pytest.raises(ValidationError, match="name"):
        Weakness(kind="class", name="", error_rate=0.5, gap=0.1, support=1)
    with pytest.raises(ValueError, match="`k` must be >= 0"):
        _profile().top(-1)
    with pytest.raises(ValueError, match="`kind` must be among"):
        _profile().by_kind("colour")


def test_ranked_by_gap_and_top():
    p = _profile()
    assert [w.gap for w in p.weaknesses] == sorted((w.gap for w in p.weaknesses), reverse=True)
    assert p.top(1)[0].key == "perturbation/rotation@3"
    assert [w.key for w in p.top(5, kind="slice")] == ["slice/group=1"]
    assert p.get("class/6").support == 10
    with pytest.raises(KeyError, match="class/6"):
        p.get("class/99")


def test_json_round_trip_and_immutable():
    p = _profile()
    again = WeaknessProfile.from_json(p.to_json())
    assert again == p
    assert again.frontier == {"rotation": 2.5}
    with pytest.raises(ValidationError):
        p.weaknesses[0].gap = 0.0  # type: ignore[misc]


def test_diff_rows_and_scores():
    before, after = _profile(0), WeaknessProfile(epoch=1, weaknesses=[
        Weakness(kind="perturbation", name="rotation", severity=3, error_rate=0.3, gap=0.2, support=64)])
    changes = {c.key: c for c in after.diff(before)}
    assert changes["perturbation/rotation@3"].change == pytest.approx(-0.2)
    assert changes["class/6"].gap_after is None
    rows = before.rows()
    assert len(rows[0]) == len(WeaknessProfile.TABLE_COLUMNS) and rows[0][0] == 1
    assert before.perturbation_scores() == {"rotation": pytest.approx(0.25)}
    assert "rotation@3" in before.format()
