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
    assert overhead.parse_args(["--malloc-trim-threshold", "1024"]).malloc_trim_threshold == 1024
    with pytest.raises(ValueError, match="`--malloc-trim-threshold` must be >= 0"):
        overhead.parse_args(["--malloc-trim-threshold", "-1"])


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


def test_the_loop_split_is_summarized_against_plain():
    def with_loop(run, batches, between, validation):
        return dict(run, loop_s={"train_batches": batches, "between_batches": between, "validation": validation})

    runs = {"plain": [dict(with_loop(_run("plain", 10.0, 100.0), 8.0, 0.5, 1.0), train_batch_faults=2_000_000)],
            "full": [dict(with_loop(_run("full", 12.0, 100.0), 8.2, 1.0, 2.5), train_batch_faults=3_500_000)]}
    entry = overhead.summarize(runs)["full"]
    assert entry["loop_added_s"] == pytest.approx({"train_batches": 0.2, "between_batches": 0.5, "validation": 1.5})
    assert entry["train_batch_faults"] == 3_500_000
    assert "8.2 (+0.2)" in overhead.loop_table(overhead.summarize(runs))
    assert "3.50M" in overhead.loop_table(overhead.summarize(runs))
    assert overhead.loop_table(overhead.summarize({"plain": [_run("plain", 10.0, 100.0)]})) == ""


def test_the_loop_split_times_a_real_fit():
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_synth.demos import ImageClassifier

    class Touching(ImageClassifier):
        """Writes a fresh 64 MiB buffer in every training step: above glibc's largest mmap threshold, so its
        pages are mapped anew, and faulted in, each time."""

        def training_step(self, batch, batch_idx):
            buffer = torch.ones(16 * 2**20)
            return super().training_step(batch, batch_idx) + 0 * buffer[-1]

    split = overhead.LoopSplit()
    data = TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, callbacks=list(split.callbacks()))
    trainer.fit(Touching(image_size=8), DataLoader(data, batch_size=8), DataLoader(data, batch_size=16))
    assert all(v > 0 for v in split.seconds.values()), split.seconds
    # 8 steps, each touching a fresh 64 MiB mapping inside the training batch: at least one fault per page,
    # counted with the largest page size the kernel may use for it (2 MiB transparent huge pages)
    assert split.faults >= 8 * 64 // 2, split.faults
