import json
import sys
from pathlib import Path

import pytest

# `benchmarks` is not an installed package: make the repository root importable under plain `pytest` too.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import analyzer_replay  # noqa: E402


def test_replay_reproduces_the_live_analyzer_and_compares_rules(tmp_path):
    payload = analyzer_replay.main(["--seeds", "0", "--train-size", "256", "--val-size", "300", "--checkpoints", "2",
                                    "--max-samples", "64", "--batch-size", "32", "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "analyzer_replay.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(payload["summary"]))
    # The replayed defaults are the live callback's probe forwards and agreement, checkpoint by checkpoint.
    fidelity = saved["fidelity"]["0"]
    assert fidelity["replayed_defaults_equal_live"] and fidelity["live"] == saved["results"]["defaults"]["0"]
    assert set(saved["summary"]) == set(analyzer_replay.RULES)
    full = 9 * 5 * 64  # the default bank and ladder on 64 probe samples
    half = saved["results"]["all_at_half"]["0"]
    assert [r["forwards"] for r in half] == [full // 2, full // 2]  # every cell on the first half of the samples
    # Rules that differ from another only after the first analysis share its first checkpoint.
    results = saved["results"]
    for rule, same_first in (("window_second", "defaults"), ("later_rank_at_half", "defaults"),
                             ("first_rank_at_half", "rank_at_half"), ("window_second_rank_at_half", "rank_at_half")):
        assert results[rule]["0"][0] == results[same_first]["0"][0], rule
    for name, s in saved["summary"].items():
        rows = results[name]["0"]
        assert s["first_two_share_of_full"] == pytest.approx(sum(r["forwards"] for r in rows[:2]) / (2 * full))
    for rows in (saved["results"][name]["0"] for name in analyzer_replay.RULES):
        assert len(rows) == 2 and all(0 < r["forwards"] <= full for r in rows)
        assert all(-1.0 <= r["top20_spearman"] <= 1.0 and r["max_frontier_diff"] >= 0 for r in rows)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="--max-samples"):
        analyzer_replay.parse_args(["--max-samples", "0"])
