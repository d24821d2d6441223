"""The overhead benchmark's summary: paired ratios per interleaved repeat, with their spread."""

import sys
from pathlib import Path

import pytest
import torch

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import overhead  # noqa: E402


def _run(config, wall, rss):
    return {"config": config, "fit_wall_s": wall, "fit_cpu_s": wall, "peak_rss_mib": rss, "phases_s": {},
            "rss_before_fit_mib": 100.0, "fit_peak_rss_mib": rss, "analyses": 0, "generated": {}, "pool_size": 0,
            "callbacks": [], "steps": 10, "val_batches": 2, "val_acc": 0.5}


def test_paired_ratios_come_with_their_spread():
    runs = {"plain": [_run("plain", w, 100.0) for w in (10.0, 20.0, 10.0)],
            "full": [_run("full", w, r) for w, r in ((11.0, 110.0), (20.0, 105.0), (13.0, 120.0))]}
    wall = overhead.summarize(runs)["full"]["fit_wall_s"]
    assert wall["paired_ratios"] == pytest.approx([1.1, 1.0, 1.3])
    assert (wall["median_paired_ratio"], wall["min_paired_ratio"], wall["max_paired_ratio"]) == pytest.approx(
        (1.1, 1.0, 1.3))
    assert overhead.summarize(runs)["full"]["peak_rss_mib"]["max_paired_ratio"] == pytest.approx(1.2)
    assert "1.10x [1.00-1.30]" in overhead.table(overhead.summarize(runs))


def test_the_memory_the_system_keeps_is_reported_beside_the_peak():
    full = [dict(_run("full", 11.0, 110.0), pool_mib=10.2, real_cache_mib=6.1, real_cache_dtype="uint8")]
    entry = overhead.summarize({"plain": [_run("plain", 10.0, 100.0)], "full": full})["full"]
    assert (entry["pool_mib"], entry["real_cache_mib"], entry["real_cache_dtype"]) == (10.2, 6.1, "uint8")


def test_names_and_repeats_are_checked():
    assert overhead.parse_args([]).repeats == 4
    assert overhead.parse_args(["--name", "overhead_10k"]).name == "overhead_10k"
    with pytest.raises(ValueError, match="`--name` must be"):
        overhead.parse_args(["--name", "../x"])
    assert overhead.parse_args(["--malloc-mmap-threshold", "131072"]).malloc_mmap_threshold == 131072
    with pytest.raises(ValueError, match="`--malloc-mmap-threshold` must be >= 0"):
        overhead.parse_args(["--malloc-mmap-threshold", "-1"])


def test_memory_trace_is_passed_to_workers_and_charges_growth_to_the_phase():
    args = overhead.parse_args(["--memory-trace"])
    assert args.memory_trace and "--memory-trace" in overhead.worker_argv(args)
    assert "--memory-trace" not in overhead.worker_argv(overhead.parse_args([]))
    if overhead._status_kib("VmHWM") is None or not overhead._reset_peak_rss():
        pytest.skip("needs Linux /proc/self/status and clear_refs")  # the worker's own conditions
    trace = overhead.MemoryTrace(interval_s=0.01)
    trace.reset()
    clock = overhead.PhaseClock(trace)
    with clock.phase("generation/test"):
        buffer = torch.ones(64 * 2**20 // 4)  # 64 MiB, written: the high-water mark grows by about that
    result = trace.result()
    assert result["growth_mib"].get("generation/test", 0.0) > 32 and float(buffer[-1]) == 1.0
    assert any(e["where"] == "generation/test" and e["at"] == "exit generation/test" for e in result["events"])
    assert all("rss_mib" in e and "heap" in e for e in result["events"])  # glibc's heap beside each (Linux)
