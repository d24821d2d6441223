# python -m benchmarks.overhead
# (from the repository root; ~10 min on 2 busy shared cores with the default 4 repeats; e.g. --configs plain full
# full_gan; --train-size 10000 --name overhead_10k for the scaling runs)
"""What the full system costs: ``Trainer.fit`` wall time and peak memory vs plain Lightning, on the same steps.

Fashion-MNIST, :class:`~lightning_synth.demos.ImageClassifier` (``arch="cnn"``), CPU, ``max_steps`` =
``--epochs`` x batches of the real training set for every configuration (the synthetic datamodule draws as
many samples per epoch as the real set has, so the epochs line up too), validation at each epoch end.

Configurations:

- ``plain``: ``FashionMNISTDataModule`` and no callbacks: plain Lightning (with the benchmark's own two timing
  callbacks, as in every configuration; see :class:`LoopSplit`).
- ``full``: ``SyntheticDataModule(dm)`` with its default generators (``TargetedAugmentation()`` alone) +
  ``FailureModeCallback()`` + ``AdaptiveSampling()``, all at their defaults (the ``SynthesisCallback`` is added
  by the datamodule).
- ``full_gan``: ``full`` with ``TargetedAugmentation``, ``ScenarioGenerator`` and
  ``ConditionalGANGenerator(ConditionalGAN(), train_steps=--gan-steps)``, the GAN
  trained in the loop before each refresh. Not in the default run: on 2 shared cores it costs more than the
  rest of the run (pass ``--configs plain full full_gan``).

Each run is a fresh subprocess (``--worker``) so that its peak RSS (``ru_maxrss``, monotone per process) is
its own; the worker loads the data and builds the model, then times ``trainer.fit`` (wall and CPU time) and
reports JSON. No warm-up: first-call costs (kernels, kornia) are paid inside ``fit``, as a user pays them.
Peak memory is reported twice: the process peak (``ru_maxrss``: imports, data and fit) and the peak during
``fit`` alone (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before ``fit``), together with
the RSS just before ``fit``, so ``fit_peak - rss_before_fit`` is what training itself added.

The phase split comes from timers wrapped, in the worker process only, around the library's hooks (no library
file changes): **analyzer** = every ``FailureModeCallback`` hook (its probes included); **generation** = every
``SynthesisCallback`` hook (the generators, the pool, the real-sample cache, the synthetic weight);
**sampling** = every ``AdaptiveSampling`` hook plus ``AdaptiveSampler.__iter__`` (the per-epoch draw).
Time is charged to the innermost timed call (a probe forward that fires the sampling callback's forward hook is
charged to sampling). Not timed: the per-item cost of the mixed real+synthetic dataset in the data loader;
it lands in ``other`` = (full - plain) - phases, together with the run-to-run noise of a shared machine.

Every configuration also splits its fit by where the loop is (:class:`LoopSplit`, two callbacks around the
others): **train batches** (from the first ``on_train_batch_start`` to the last ``on_train_batch_end``: the
training step and every callback's batch hooks), **between batches** (data loading and Lightning's loop inside
an epoch) and **validation** (the analyzer included); the rest is epoch boundaries (where the system
generates) and setup. A difference in *train batches* between configurations is training work or noise, one
in *between batches* is mostly the mixed dataset's items. The page faults inside the training batches are
counted too (``train_batch_faults``): on glibc they follow malloc's dynamic mmap/trim thresholds, differ from
run to run of the same configuration, and cost about a microsecond each; ``--malloc-mmap-threshold`` with
``--malloc-trim-threshold`` (both large) fixes the allocator for a diagnostic run without them.

Repeats are interleaved, alternating the order (ABBA...) so drift hits every configuration alike; reported:
median wall / CPU seconds, ratio of medians to ``plain``, the per-repeat (paired) ratios with their median,
minimum and maximum (on a shared machine the spread of the paired ratios, not one run, says whether a target
is met), peak RSS and the phase medians. ``--threads 1`` (default): on a small shared CPU one thread is
faster and steadier than torch's default; ``--threads 0`` for torch's own choice. Writes
``<results-dir>/overhead.json`` and ``overhead.png`` (phase split and memory) and prints a table; ``--name``
changes the file names (the training-set-size runs write ``overhead_10k`` and ``overhead_55k``).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import RESULTS_DIR, format_table, machine_info, pyplot, quiet_lightning, write_json

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "plain"
CONFIGS: dict[str, str] = {
    "plain": "FashionMNISTDataModule, no callbacks (plain Lightning)",
    "full": "SyntheticDataModule(dm) [default generators: TargetedAugmentation] + FailureModeCallback() "
            "+ AdaptiveSampling()",
    "full_gan": "full with [TargetedAugmentation, ScenarioGenerator, "
                "ConditionalGANGenerator(ConditionalGAN(), train_steps=--gan-steps)]",
}
PHASES = ("analyzer", "generation", "sampling")
# Diagnostic allocator settings: the argument (``--malloc-mmap-threshold`` ...) and the glibc variable it sets
MALLOC_ENV = (("malloc_mmap_threshold", "MALLOC_MMAP_THRESHOLD_"), ("malloc_trim_threshold", "MALLOC_TRIM_THRESHOLD_"))


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=20000, help="real training samples")
    parser.add_argument("--val-size", type=int, default=2000, help="validation samples")
    parser.add_argument("--epochs", type=int, default=2, help="budget in epochs of the real training set")
    parser.add_argument("--repeats", type=int, default=4, help="timed runs of every configuration")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--configs", nargs="+", default=["plain", "full"], choices=list(CONFIGS),
                        help="configurations to run (plain is always run: it is the baseline)")
    parser.add_argument("--gan-steps", type=int, default=20,
                        help="GAN training steps before each refresh (full_gan only)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); 1 is faster and steadier on a shared box")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="diagnostic: run the workers with glibc's mmap threshold fixed at BYTES "
                             "(MALLOC_MMAP_THRESHOLD_); a small one (131072) sends freed large buffers back to the "
                             "OS at once, so the peak RSS follows live memory rather than the heap's retention (slows "
                             "every fit); a large one with --malloc-trim-threshold keeps them (no page faults)")
    parser.add_argument("--malloc-trim-threshold", type=int, default=None, metavar="BYTES",
                        help="diagnostic: run the workers with glibc's trim threshold fixed at BYTES "
                             "(MALLOC_TRIM_THRESHOLD_); with a large mmap threshold too, freed buffers stay in the "
                             "heap and the page faults of re-touching them (see `train_batch_faults`) are gone")
    parser.add_argument("--memory-trace", action="store_true",
                        help="diagnostic: read the RSS high-water mark at every phase boundary and report where "
                             "it grew (with glibc's heap then) under each run's `memory_trace`")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="overhead", help="results file names: <name>.json and <name>.png")
    parser.add_argument("--worker", choices=list(CONFIGS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.val_size < 60000:
        raise ValueError(f"`--val-size` must be in (0, 60000), got {args.val_size}")
    if not 0 < args.train_size <= 60000 - args.val_size:
        raise ValueError(f"`--train-size` must be in [1, 60000 - --val-size], got {args.train_size}")
    for flag, value in (("--epochs", args.epochs), ("--repeats", args.repeats), ("--batch-size", args.batch_size),
                        ("--gan-steps", args.gan_steps)):
        if value < 1:
            raise ValueError(f"`{flag}` must be >= 1, got {value}")
    if len(set(args.configs)) != len(args.configs):
        raise ValueError(f"`--configs` must not repeat a name, got {args.configs}")
    if not args.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"`--name` must be letters, digits, '_' or '-', got {args.name!r}")
    if args.threads < 0:
        raise ValueError(f"`--threads` must be >= 0, got {args.threads}")
    for attr, _ in MALLOC_ENV:
        value = getattr(args, attr)
        if value is not None and value < 0:
            raise ValueError(f"`--{attr.replace('_', '-')}` must be >= 0, got {value}")
    if (args.worker is None) != (args.worker_out is None):
        raise ValueError("`--worker` and `--worker-out` go together")
    args.configs = [BASELINE, *(c for c in args.configs if c != BASELINE)]
    return args


def max_steps(args: argparse.Namespace) -> int:
    return args.epochs * math.ceil(args.train_size / args.batch_size)


# ------------------------------------------------------------------------------------------------ timers
class PhaseClock:
    """Exclusive time per phase: a nested timed call pauses its caller's phase; with a ``trace``, the memory
    high-water mark is read at every phase boundary (see :class:`MemoryTrace`)."""

    def __init__(self, trace: MemoryTrace | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.trace = trace
        self._stack: list[str] = []
        self._mark = 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.trace is not None:
            self.trace.mark(self._stack[-1] if self._stack else "outside phases", f"enter {name}")
            self.trace.current.append(name)
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._mark
        self._stack.append(name)
        self.calls[name] += 1
        self._mark = now
        try:
            yield
        finally:
            now = time.perf_counter()
            self.seconds[self._stack.pop()] += now - self._mark
            self._mark = now
            if self.trace is not None:
                self.trace.current.pop()
                self.trace.mark(name, f"exit {name}")


def _wrap(clock: PhaseClock, owner: type, attr: str, phase: str) -> None:
    if attr not in owner.__dict__:
        raise AttributeError(f"overhead: {owner.__name__} no longer defines {attr!r}; update `instrument`")
    original = owner.__dict__[attr]

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with clock.phase(phase):
            return original(*args, **kwargs)

    setattr(owner, attr, timed)


def _hooks(cls: type) -> list[str]:
    """The Lightning callback hooks that ``cls`` itself defines."""
    return sorted(n for n in vars(cls) if n in vars(Callback) and callable(vars(cls)[n]) and not n.startswith("__")
                  and n not in ("state_dict", "load_state_dict", "state_key"))


def instrument(clock: PhaseClock) -> dict[str, list[str]]:
    """Patch the library's classes, in this process only, so that their work is charged to a phase."""
    from lightning_synth.callbacks import AdaptiveSampling, FailureModeCallback, SynthesisCallback
    from lightning_synth.callbacks._validation_hooks import LogitsTap
    from lightning_synth.data import AdaptiveSampler, SyntheticDataModule
    from lightning_synth.engine import SynthesisEngine
    from lightning_synth.generators import ConditionalGANGenerator, ScenarioGenerator, TargetedAugmentation

    plan: list[tuple[type, list[str], str]] = [
        (FailureModeCallback, _hooks(FailureModeCallback), "analyzer"),
        (LogitsTap, ["_capture"], "analyzer"),
        (SynthesisCallback, _hooks(SynthesisCallback), "generation/bookkeeping"),
        (SynthesisEngine, ["reweight"], "generation/weighting"),
        (SyntheticDataModule, ["real_cache"], "generation/real_cache"),
        (AdaptiveSampling, [*_hooks(AdaptiveSampling), "_capture", "_prepare_loader"], "sampling/callback"),
        (AdaptiveSampler, ["__iter__"], "sampling/draw"),
    ]
    plan += [(cls, ["generate"], f"generation/{cls.name}")
             for cls in (TargetedAugmentation, ScenarioGenerator, ConditionalGANGenerator)]
    done: dict[str, list[str]] = defaultdict(list)
    for owner, attrs, phase in plan:
        for attr in attrs:
            _wrap(clock, owner, attr, phase)
            done[phase].append(f"{owner.__name__}.{attr}")
    return dict(done)


class LoopSplit:
    """Seconds of a fit by where the loop is: ``train_batches``, ``between_batches``, ``validation``.

    :meth:`callbacks` gives two callbacks to put first and last in the trainer's list, so that a training
    batch runs from the first callback's ``on_train_batch_start`` to the last one's ``on_train_batch_end``.
    ``faults`` counts the process's page faults (minor and major) inside the training batches: on glibc, a
    training step whose activations are served by fresh ``mmap`` pages (or by heap pages trimmed and touched
    again) pays a fault per 4 KiB page, and how many it pays depends on malloc's dynamic thresholds, which
    differ from run to run: the main source of the train batches' run-to-run spread on this benchmark's CPU.
    """

    def __init__(self) -> None:
        self.seconds = {"train_batches": 0.0, "between_batches": 0.0, "validation": 0.0}
        self.faults = 0
        self._faults_start = 0
        self._batch_start: float | None = None
        self._batch_end: float | None = None  # None at an epoch's start and after validation
        self._validation_start = 0.0

    def callbacks(self) -> tuple[Callback, Callback]:
        split = self

        class First(Callback):
            def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
                split._batch_end = None

            def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                     batch_idx: int) -> None:
                split._faults_start = _page_faults()
                split._batch_start = time.perf_counter()
                if split._batch_end is not None:
                    split.seconds["between_batches"] += split._batch_start - split._batch_end

            def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
                split._validation_start = time.perf_counter()

        class Last(Callback):
            def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                   batch: Any, batch_idx: int) -> None:
                split._batch_end = time.perf_counter()
                if split._batch_start is not None:
                    split.seconds["train_batches"] += split._batch_end - split._batch_start
                    split.faults += _page_faults() - split._faults_start

            def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
                split.seconds["validation"] += time.perf_counter() - split._validation_start
                split._batch_end = None

        return First(), Last()


# ------------------------------------------------------------------------------------------------ memory
def _page_faults() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_info() -> dict[str, float] | None:
    """glibc's heap, MiB (``mallinfo2``, glibc >= 2.33; ``None`` elsewhere): ``heap`` (the main arena, in use
    or free), ``heap_free`` (free chunks in it, kept by the process), ``mmapped`` (chunks mapped one by one)."""
    try:
        libc = ctypes.CDLL(None)
        call = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    call.restype = _MallInfo2
    info = call()
    return {"heap": info.arena / 2**20, "heap_free": info.fordblks / 2**20, "mmapped": info.hblkhd / 2**20}


class MemoryTrace:
    """Where the RSS high-water mark grows (diagnostic, ``--memory-trace``).

    Read at every phase boundary: growth seen at a phase's exit is charged to that phase; growth seen on
    entering a phase happened since the last boundary, outside any timed phase (the training step, the data
    loader) or in the enclosing phase. ``events`` lists each growth with the RSS and glibc's heap then,
    ``growth_mib`` sums it by where. A thread also samples the RSS and the heap every ``interval_s`` into
    ``timeline`` (with the innermost phase running then), which is all there is for plain Lightning.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.start = time.perf_counter()
        self.events: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = []
        self.growth_mib: dict[str, float] = defaultdict(float)
        self.current: list[str] = []
        self._hwm = _status_kib("VmHWM") or 0
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        self._hwm = _status_kib("VmHWM") or 0
        self.start = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _snapshot(self) -> dict[str, Any]:
        return {"t_s": round(time.perf_counter() - self.start, 3), "hwm_mib": _mib(_status_kib("VmHWM")),
                "rss_mib": _mib(_status_kib("VmRSS")), **(malloc_info() or {})}

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.timeline.append({**self._snapshot(), "phase": self.current[-1] if self.current else None})

    def mark(self, where: str, boundary: str) -> None:
        hwm = _status_kib("VmHWM")
        if hwm is None or hwm <= self._hwm:
            return
        grown, self._hwm = (hwm - self._hwm) / 1024, hwm
        self.growth_mib[where] += grown
        self.events.append({**self._snapshot(), "where": where, "at": boundary, "grown_mib": round(grown, 2)})

    def result(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.mark("outside phases", "end of fit")
        return {"growth_mib": dict(sorted(self.growth_mib.items(), key=lambda kv: -kv[1])), "events": self.events,
                "timeline": self.timeline, "malloc_at_end": malloc_info()}


# ------------------------------------------------------------------------------------------------ worker
def build(config: str, args: argparse.Namespace) -> tuple[Any, L.LightningDataModule, list[Callback]]:
    from lightning_synth.demos import ImageClassifier

    class CountingClassifier(ImageClassifier):
        """Counts validation batches: every configuration must validate as often (a counter, no timer)."""

        validation_batches = 0

        def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.validation_batches += 1
            return super().validation_step(batch, batch_idx)

    from lightning_synth import (
        AdaptiveSampling,
        ConditionalGAN,
        ConditionalGANGenerator,
        FailureModeCallback,
        ScenarioGenerator,
        SyntheticDataModule,
        TargetedAugmentation,
    )
    from lightning_synth.datasets import FashionMNISTDataModule

    real = FashionMNISTDataModule(batch_size=args.batch_size, val_size=args.val_size, train_size=args.train_size,
                                  seed=args.seed)
    real.setup("fit")  # idempotent: loading the files stays out of the timed fit in every configuration
    model = CountingClassifier(num_classes=10, in_channels=1, image_size=28, arch="cnn")
    if config == BASELINE:
        return model, real, []
    generators = None
    if config == "full_gan":
        generators = [TargetedAugmentation(), ScenarioGenerator(),
                      ConditionalGANGenerator(ConditionalGAN(), train_steps=args.gan_steps)]
    dm = SyntheticDataModule(real, generators=generators, seed=args.seed)
    return model, dm, [FailureModeCallback(), AdaptiveSampling()]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    config = args.worker
    quiet_lightning()
    if args.threads:
        torch.set_num_threads(args.threads)
    trace = MemoryTrace() if args.memory_trace else None
    clock = PhaseClock(trace)
    instrumented = instrument(clock)
    L.seed_everything(args.seed, verbose=False)
    model, dm, callbacks = build(config, args)
    split = LoopSplit()
    first, last = split.callbacks()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=max_steps(args), max_epochs=-1, logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            num_sanity_val_steps=0, default_root_dir=root, callbacks=[first, *callbacks, last],
        )
        rss_before = _status_kib("VmRSS")
        peak_reset = _reset_peak_rss()
        if trace is not None:
            trace.reset()
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.fit(model, datamodule=dm)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        fit_peak = _status_kib("VmHWM") if peak_reset else None
    result: dict[str, Any] = {
        "config": config,
        "fit_wall_s": wall,
        "fit_cpu_s": cpu,  # all threads of this process; steadier than wall time on a shared machine
        "phases_s": dict(sorted(clock.seconds.items())),
        "phase_calls": dict(sorted(clock.calls.items())),
        "loop_s": dict(split.seconds),
        "train_batch_faults": split.faults,
        "instrumented": instrumented,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "rss_before_fit_mib": _mib(rss_before),
        "fit_peak_rss_mib": _mib(fit_peak),
        "steps": trainer.global_step,
        "val_batches": model.validation_batches,
        "val_acc": float(trainer.callback_metrics.get("val_acc", float("nan"))),
        "threads": torch.get_num_threads(),
    }
    result.update(system_facts(trainer, dm))
    if trace is not None:
        result["memory_trace"] = trace.result()
    check(result, args)
    return result


def system_facts(trainer: L.Trainer, dm: L.LightningDataModule) -> dict[str, Any]:
    from lightning_synth import FailureModeCallback, SyntheticDataModule

    analyzers = [c for c in trainer.callbacks if isinstance(c, FailureModeCallback)]  # type: ignore[attr-defined]
    if not isinstance(dm, SyntheticDataModule):
        return {"analyses": 0, "generated": {}, "pool_size": 0, "pool_mib": 0.0, "real_cache_mib": 0.0,
                "real_cache_dtype": None, "callbacks": []}
    return {
        "analyses": sum(len(c.history) for c in analyzers),
        "generated": dict(dm.generated),
        "pool_size": len(dm.pool),
        # what the system keeps in RAM beyond plain training (the rest of its peak is transient)
        "pool_mib": dm.pool.nbytes / 2**20,
        "real_cache_mib": dm.engine.real.pixels.nbytes / 2**20,
        "real_cache_dtype": str(dm.engine.real.pixels.dtype).removeprefix("torch."),
        "callbacks": sorted(type(c).__name__ for c in trainer.callbacks  # type: ignore[attr-defined]
                            if type(c).__module__.startswith("lightning_synth")),
    }


def check(result: dict[str, Any], args: argparse.Namespace) -> None:
    # A run on fewer steps, or a silently inactive system, would make its ratio look like a result.
    if result["steps"] != max_steps(args):
        raise RuntimeError(f"{result['config']}: ran {result['steps']} steps, expected {max_steps(args)}")
    val_batches = args.epochs * math.ceil(args.val_size / args.batch_size)
    if result["val_batches"] != val_batches:
        raise RuntimeError(f"{result['config']}: ran {result['val_batches']} validation batches, "
                           f"expected {val_batches}")
    if result["config"] == BASELINE:
        return
    if result["analyses"] < args.epochs or not result["generated"] or "sampling/callback" not in result["phases_s"]:
        raise RuntimeError(f"{result['config']}: the system did not run (analyses {result['analyses']}, "
                           f"generated {result['generated']}): the timing is not valid")


# ------------------------------------------------------------------------------------------------ parent
def worker_argv(args: argparse.Namespace) -> list[str]:
    return ["--train-size", str(args.train_size), "--val-size", str(args.val_size), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--gan-steps", str(args.gan_steps), "--threads", str(args.threads),
            "--seed", str(args.seed), *(["--memory-trace"] if args.memory_trace else [])]


def run_worker(config: str, args: argparse.Namespace, folder: Path, repeat: int) -> dict[str, Any]:
    out = folder / f"{config}_{repeat}.json"
    command = [sys.executable, "-m", "benchmarks.overhead", "--worker", config, "--worker-out", str(out),
               *worker_argv(args)]
    env = dict(os.environ)
    for attr, name in MALLOC_ENV:
        if getattr(args, attr) is not None:
            env[name] = str(getattr(args, attr))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {config} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["process_wall_s"] = time.perf_counter() - start
    return result


def interleaved(configs: Sequence[str], repeats: int, run: Callable[[str, int], dict[str, Any]]
                ) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(repeats):
        for config in configs if r % 2 == 0 else list(reversed(configs)):
            result = run(config, r)
            runs[config].append(result)
            print(f"  repeat {r + 1}/{repeats} {config:<9} fit {result['fit_wall_s']:7.2f} s  "
                  f"peak RSS {result['peak_rss_mib']:7.1f} MiB  "
                  f"train-batch page faults {result['train_batch_faults'] / 1e6:.2f}M", flush=True)
    return runs


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def phase_totals(phases: dict[str, float]) -> dict[str, float]:
    return {p: sum(v for k, v in phases.items() if k == p or k.startswith(f"{p}/")) for p in PHASES}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    base = runs[BASELINE]
    med = {key: _median([r[key] for r in base]) for key in ("fit_wall_s", "fit_cpu_s", "peak_rss_mib")}
    base_fit_add = _median([_fit_added(r) for r in base])
    out: dict[str, dict[str, Any]] = {}
    for config, results in runs.items():
        entry: dict[str, Any] = {"description": CONFIGS[config], "runs": results}
        for key in ("fit_wall_s", "fit_cpu_s", "peak_rss_mib"):
            values = [r[key] for r in results]
            median = statistics.median(values)
            paired = [v / b[key] for v, b in zip(values, base, strict=True)]
            entry[key] = {"values": values, "median": median, "ratio_of_medians": median / med[key],
                          "paired_ratios": paired, "median_paired_ratio": statistics.median(paired),
                          "min_paired_ratio": min(paired), "max_paired_ratio": max(paired),
                          "added": median - med[key]}
        fit_added = _median([_fit_added(r) for r in results])
        entry["fit_rss_added_mib"] = {
            "median": fit_added,
            "added_vs_plain": None if fit_added is None or base_fit_add is None else fit_added - base_fit_add,
        }
        subphases = sorted({k for r in results for k in r["phases_s"]})
        entry["subphases_s"] = {k: statistics.median(r["phases_s"].get(k, 0.0) for r in results) for k in subphases}
        totals = [phase_totals(r["phases_s"]) for r in results]
        entry["phases_s"] = {p: statistics.median(t[p] for t in totals) for p in PHASES}
        attributed = sum(entry["phases_s"].values())
        entry["phases_share_of_added"] = {p: s / entry["fit_wall_s"]["added"] if entry["fit_wall_s"]["added"] > 0
                                          else None for p, s in entry["phases_s"].items()}
        entry["other_s"] = entry["fit_wall_s"]["added"] - attributed if config != BASELINE else 0.0
        entry["phases_ratio_to_plain"] = {p: s / med["fit_wall_s"] for p, s in entry["phases_s"].items()}
        if all("loop_s" in r for r in (*results, *base)):  # absent from results of older commits
            entry["loop_s"] = {k: statistics.median(r["loop_s"][k] for r in results) for k in results[0]["loop_s"]}
            entry["loop_added_s"] = {k: v - statistics.median(r["loop_s"][k] for r in base)
                                     for k, v in entry["loop_s"].items()}
        if all("train_batch_faults" in r for r in results):  # absent from results of older commits
            entry["train_batch_faults"] = statistics.median(r["train_batch_faults"] for r in results)
        for key in ("analyses", "generated", "pool_size", "callbacks", "steps", "val_batches"):
            entry[key] = results[-1][key]
        for key in ("pool_mib", "real_cache_mib", "real_cache_dtype"):  # absent from results of older commits
            entry[key] = results[-1].get(key)
        entry["val_acc"] = [r["val_acc"] for r in results]
        out[config] = entry
    return out


def _fit_added(result: dict[str, Any]) -> float | None:
    peak, before = result["fit_peak_rss_mib"], result["rss_before_fit_mib"]
    return None if peak is None or before is None else peak - before


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for config, r in results.items():
        wall, cpu, rss = r["fit_wall_s"], r["fit_cpu_s"], r["peak_rss_mib"]
        added = r["fit_rss_added_mib"]["median"]
        rows.append([
            config, f"{wall['median']:.1f}", f"{wall['ratio_of_medians']:.2f}x", _paired(wall), _paired(cpu),
            *(f"{r['phases_s'][p]:.1f}" for p in PHASES), f"{r['other_s']:+.1f}", f"{rss['median']:.0f}",
            f"{rss['ratio_of_medians']:.2f}x", _paired(rss), "-" if added is None else f"{added:.0f}",
        ])
    headers = ["config", "fit s", "wall ratio", "paired wall [min-max]", "paired cpu [min-max]", "analyzer s",
               "generation s", "sampling s", "other s", "peak RSS MiB", "RSS ratio", "paired RSS [min-max]",
               "fit +RSS MiB"]
    return format_table(headers, rows)


def loop_table(results: dict[str, dict[str, Any]]) -> str:
    """The loop split's medians per configuration, with the difference to plain (empty without the split)."""
    rows = [[config, *(f"{r['loop_s'][k]:.1f} ({r['loop_added_s'][k]:+.1f})" for k in r["loop_s"]),
             f"{r['train_batch_faults'] / 1e6:.2f}M" if "train_batch_faults" in r else "-"]
            for config, r in results.items() if "loop_s" in r]
    if not rows:
        return ""
    return format_table(["config", "train batches s (vs plain)", "between batches s", "validation s",
                         "page faults in train batches (median)"], rows)


def _paired(stat: dict[str, Any]) -> str:
    return f"{stat['median_paired_ratio']:.2f}x [{stat['min_paired_ratio']:.2f}-{stat['max_paired_ratio']:.2f}]"


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 2.4 + 0.9 * len(results)),
                                      gridspec_kw={"width_ratios": [3, 2]})
    names = list(results)
    y = list(range(len(names)))[::-1]
    colours = {"rest of fit": "#9e9e9e", "analyzer": "#d62728", "generation": "#1f77b4", "sampling": "#2ca02c"}
    left_edge = [0.0] * len(names)
    for part, colour in colours.items():
        widths = []
        for config in names:
            r = results[config]
            phases = sum(r["phases_s"].values())
            widths.append(r["fit_wall_s"]["median"] - phases if part == "rest of fit" else r["phases_s"][part])
        left.barh(y, widths, left=left_edge, color=colour, label=part)
        left_edge = [a + b for a, b in zip(left_edge, widths, strict=True)]
    base = results[BASELINE]["fit_wall_s"]["median"]
    left.axvline(base, color="black", linestyle="--", linewidth=1, label="plain fit")
    for yi, config in zip(y, names, strict=True):
        ratio = results[config]["fit_wall_s"]["ratio_of_medians"]
        left.text(results[config]["fit_wall_s"]["median"], yi, f" {ratio:.2f}x", va="center")
    left.set_yticks(y, names)
    left.set_xlabel("Trainer.fit wall time, s (median)")
    left.set_xlim(0, 1.15 * max(r["fit_wall_s"]["median"] for r in results.values()))
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=5, fontsize=8, frameon=False)
    peak = [results[c]["peak_rss_mib"]["median"] for c in names]
    right.barh(y, peak, color="#7f7f7f", label="process peak RSS")
    added = [results[c]["fit_rss_added_mib"]["median"] for c in names]
    if all(a is not None for a in added):
        right.barh(y, added, color="#ff7f0e", height=0.4, label="added during fit")
    for yi, config in zip(y, names, strict=True):
        right.text(results[config]["peak_rss_mib"]["median"], yi,
                   f" {results[config]['peak_rss_mib']['ratio_of_medians']:.2f}x", va="center")
    right.set_yticks(y, names)
    right.set_xlabel("memory, MiB (median)")
    right.set_xlim(0, 1.2 * max(peak))
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        result = worker(args)
        args.worker_out.write_text(json.dumps(result))
        return result
    machine = machine_info()
    command = shlex.join(["python", "-m", "benchmarks.overhead", *(sys.argv[1:] if argv is None else argv)])
    steps = max_steps(args)
    print(f"{len(args.configs)} configurations x {args.repeats} repeats, each a fresh process: {steps} steps "
          f"({args.epochs} epochs of {args.train_size} samples), validation on {args.val_size}", flush=True)
    load_start = os.getloadavg()
    wall_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        runs = interleaved(args.configs, args.repeats, lambda c, r: run_worker(c, args, Path(folder), r))
    results = summarize(runs)
    print()
    print(table(results))
    print()
    print(loop_table(results))
    payload = {
        "benchmark": "overhead",
        "command": command,
        "machine": machine,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "total_wall_s": time.perf_counter() - wall_start,
        "config": {"dataset": "fashion-mnist", "model": "ImageClassifier(arch='cnn', width=32)",
                   "accelerator": "cpu", "train_size": args.train_size, "val_size": args.val_size,
                   "epochs": args.epochs, "max_steps": steps, "batch_size": args.batch_size,
                   "repeats": args.repeats, "seed": args.seed, "threads": args.threads or "torch default",
                   **{attr: getattr(args, attr) for attr, _ in MALLOC_ENV},
                   "gan_steps": args.gan_steps if "full_gan" in args.configs else None,
                   "configs": {c: CONFIGS[c] for c in args.configs}, "phases": list(PHASES)},
        "results": results,
    }
    path = write_json(args.results_dir / f"{args.name}.json", payload)
    title = (f"lightning_synth overhead: Fashion-MNIST CNN, {steps} steps, {args.val_size} val, "
             f"threads={args.threads or 'default'}, repeats={args.repeats}")
    png = plot(results, args.results_dir / f"{args.name}.png", title)
    print(f"\nwrote {path}\nwrote {png}")
    return payload


if __name__ == "__main__":
    main()
