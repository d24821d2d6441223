import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger

from lightning_synth.batch import BatchAdapter
from lightning_synth.callbacks import AdaptiveSampling, FailureModeCallback, SynthesisCallback
from lightning_synth.data import SyntheticDataModule
from lightning_synth.datasets import DigitsDataModule, FashionMNISTDataModule, fashion_mnist_dir
from lightning_synth.demos import ImageClassifier
from lightning_synth.generators import (
    ConditionalGAN,
    ConditionalGANGenerator,
    ScenarioGenerator,
    TargetedAugmentation,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cli.py"
CONFIG = ROOT / "examples" / "cli_config.yaml"


def _cli_module():
    spec = importlib.util.spec_from_file_location("lightning_synth_example_cli", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _cli_module()


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    # LightningCLI warns when it sees command-line arguments (pytest's) besides `args=`.
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])


def _config(tmp_path: Path, name: str, content: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content))
    return str(path)


def _build(*args: str):
    return cli.main(args=["--config", str(CONFIG), *args], run=False)


def test_bad_arguments_raise(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _build("--model.arch=rnn")
    assert 'Parser key "model.arch"' in capsys.readouterr().err
    with pytest.raises(ValueError, match="`batch_size` must be >= 1, got 0"):
        _build("--data.datamodule.init_args.batch_size=0")
    with pytest.raises(ValueError, match="synthetic_budget"):
        _build("--data.synthetic_budget=-1")
    generators = {"data": {"generators": [
        {"class_path": "lightning_synth.generators.TargetedAugmentation", "init_args": {"temperature": -1.0}}]}}
    with pytest.raises(ValueError, match="`temperature`"):
        _build("--config", _config(tmp_path, "bad_generator.yaml", generators))
    callbacks = {"trainer": {"callbacks": [
        {"class_path": "lightning_synth.callbacks.FailureModeCallback", "init_args": {"severities": [7]}}]}}
    with pytest.raises(ValueError, match=r"`severities` must be integers in 1\.\.5"):
        _build("--config", _config(tmp_path, "bad_callback.yaml", callbacks))


def test_shipped_config_builds_every_part():
    built = _build()
    assert isinstance(built.model, ImageClassifier)
    dm = built.datamodule
    assert isinstance(dm, SyntheticDataModule) and isinstance(dm.datamodule, FashionMNISTDataModule)
    assert dm.datamodule.train_size == 5000
    assert [type(g) for g in dm.generators] == [TargetedAugmentation, ScenarioGenerator]
    kinds = [type(c) for c in built.trainer.callbacks]
    assert FailureModeCallback in kinds and AdaptiveSampling in kinds
    assert isinstance(built.trainer.logger, CSVLogger)
    assert built.trainer.max_epochs in (1, 2)


def test_every_configurable_class_builds_from_yaml(tmp_path):
    """The GAN generator, batch adapters and every callback argument type-check under jsonargparse."""
    content = {
        "model": {"image_size": 8, "arch": "mlp"},
        "data": {
            "datamodule": {"class_path": "lightning_synth.datasets.DigitsDataModule",
                           "init_args": {"batch_size": 32, "val_size": 300}},
            "generators": [
                {"class_path": "lightning_synth.generators.TargetedAugmentation",
                 "init_args": {"perturbations": ["rotation", "gaussian_noise"], "min_share": 0.1}},
                {"class_path": "lightning_synth.generators.ScenarioGenerator",
                 "init_args": {"mix": {"compound": 1.0, "confusion": 2.0}, "top_k": 2}},
                {"class_path": "lightning_synth.generators.ConditionalGANGenerator",
                 "init_args": {"train_steps": 2, "gan": {
                     "class_path": "lightning_synth.generators.ConditionalGAN",
                     "init_args": {"latent_dim": 8, "image_size": 8, "width": 8, "betas": [0.5, 0.9]}}}},
            ],
            "batch_adapter": {"class_path": "lightning_synth.batch.BatchAdapter",
                              "init_args": {"slice_keys": ["group"]}},
            "eviction": "lowest_quality",
            "max_pool_bytes": 1_000_000,
        },
        "trainer": {"callbacks": [
            {"class_path": "lightning_synth.callbacks.FailureModeCallback",
             "init_args": {"perturbations": ["rotation"], "batch_adapter": {
                 "class_path": "lightning_synth.batch.BatchAdapter", "init_args": {"target_key": "label"}}}},
            {"class_path": "lightning_synth.callbacks.AdaptiveSampling",
             "init_args": {"prior": "max", "normalize": "none", "num_samples": 100}},
        ]},
    }
    built = _build("--config", _config(tmp_path, "full.yaml", content))
    dm = built.datamodule
    assert isinstance(dm.datamodule, DigitsDataModule)
    gan_generator = dm.generators[2]
    assert isinstance(gan_generator, ConditionalGANGenerator) and isinstance(gan_generator.gan, ConditionalGAN)
    assert gan_generator.train_steps == 2
    assert dm.generators[0].bank.names == ["rotation", "gaussian_noise"]
    assert isinstance(dm.adapter, BatchAdapter)
    failure, sampling = built.trainer.callbacks[:2]
    assert isinstance(failure.adapter, BatchAdapter) and failure.bank.names == ["rotation"]
    assert sampling.sampler_kwargs["prior"] == "max" and sampling.normalize == "none"


def _digits_override(tmp_path: Path) -> str:
    return _config(tmp_path, "digits.yaml", {
        "model": {"image_size": 8, "arch": "mlp", "width": 32, "lr": 0.01},
        "data": {"datamodule": {"class_path": "lightning_synth.datasets.DigitsDataModule",
                                "init_args": {"batch_size": 64, "val_size": 300}},
                 "synthetic_budget": 128, "real_cache_size": 256},
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2, "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "cli"}},
            # The shipped config names Fashion-MNIST classes; digits have their own.
            "callbacks": [{"class_path": "lightning_synth.callbacks.FailureModeCallback",
                           "init_args": {"max_samples": 64, "severities": [3], "class_names": None}},
                          {"class_path": "lightning_synth.callbacks.AdaptiveSampling"}],
        },
    })


def test_cli_fit_end_to_end_on_digits(tmp_path):
    ran = cli.main(args=["fit", "--config", str(CONFIG), "--config", _digits_override(tmp_path)])
    trainer = ran.trainer
    assert trainer.state.finished and trainer.current_epoch == 1
    assert any(isinstance(c, SynthesisCallback) for c in trainer.callbacks)
    log_dir = Path(trainer.log_dir)
    assert (log_dir / "config.yaml").exists()  # LightningCLI saved the resolved config next to the logs
    assert (log_dir / "lightning_synth" / "profile_epoch0.json").exists()
    with open(log_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    columns = set(rows[0])
    assert {"synth/weight", "synth/generated/targeted", "synth/generated/scenario", "weakness/clean_error",
            "val_acc"} <= columns
    assert any(row["synth/pool_size"] not in ("", "0.0") for row in rows)


@pytest.mark.slow
@pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
def test_shipped_command_runs_on_fashion_mnist(tmp_path):
    """The command in the example's first line, with the shipped config shrunk to a few batches."""
    command = [sys.executable, str(SCRIPT), "fit", "--config", str(CONFIG),
               "--data.datamodule.init_args.train_size=512", "--data.synthetic_budget=128",
               "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
               "--trainer.enable_progress_bar=false"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lightning_synth summary" in done.stdout + done.stderr
    runs = list((tmp_path / "runs" / "cli").rglob("metrics.csv"))
    assert len(runs) == 1 and "synth/weight" in runs[0].read_text().splitlines()[0]
