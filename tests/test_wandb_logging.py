"""W&B logging, offline (no account, no network): a real fit, then the run's files are read back."""

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_synth.callbacks import FailureModeCallback
from lightning_synth.data import SyntheticDataModule
from lightning_synth.datasets import DigitsDataModule
from lightning_synth.demos import ImageClassifier
from lightning_synth.generators import ScenarioGenerator, TargetedAugmentation
from lightning_synth.logging import image_grid
from lightning_synth.profile import WeaknessProfile

wandb = pytest.importorskip("wandb")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"`images` must be \(N, C, H, W\), got shape \(3, 8, 8\)"):
        image_grid(torch.zeros(3, 8, 8))


# ------------------------------------------------------------------------------------ reading a .wandb file
# A run's .wandb file is a LevelDB-style log of protobuf `Record`s: a 7-byte header (":W&B", magic, version),
# then 32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1) | payload`; type 1 is a whole record,
# 2/3/4 its first/middle/last chunk. wandb no longer ships a Python reader (its core is in Go).
_BLOCK, _CHUNK_HEADER = 32 * 1024, 7


def _records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"not a .wandb file: {data[:8]!r}"
    pos, parts = 7, []
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        if kind == 0 and length == 0:
            break
        payload = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos}"
        pos += _CHUNK_HEADER + length
        parts.append(payload)
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _history(path: Path) -> list[dict[str, Any]]:
    """Each logged row as ``{key: value}``; media (tables, images) come back as dicts of their fields."""
    rows = []
    for record in _records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            value = json.loads(item.value_json)
            if len(keys) == 1:
                row[keys[0]] = value
            else:
                row.setdefault(keys[0], {})[keys[1]] = value
        rows.append(row)
    return rows


def _wait_for_exit_record(path: Path, timeout: float = 30.0) -> None:
    """Wait until the run file ends with its ``exit`` record (the run is completely on disk)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in _records(path)):
                return
        except AssertionError:  # a chunk still being written
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no `exit` record after {timeout} s ({path.stat().st_size} bytes)")
        time.sleep(0.2)


# -------------------------------------------------------------------------------------------------- test
@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DIR": tmp_path, "WANDB_CACHE_DIR": tmp_path / "cache",
                        "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_fit_logs_profile_table_sample_grids_and_scalars_to_wandb(tmp_path, offline_wandb):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lightning_synth-test")
    dm = SyntheticDataModule(DigitsDataModule(val_size=300), synthetic_budget=128, real_cache_size=256,
                             generators=[TargetedAugmentation(), ScenarioGenerator()])
    analyzer = FailureModeCallback(max_samples=64, severities=[2, 4])
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0,
                        log_every_n_steps=1, logger=logger, callbacks=[analyzer], accelerator="cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    try:
        trainer.fit(ImageClassifier(image_size=8, arch="mlp", width=32, lr=1e-2), datamodule=dm)
        files = Path(logger.experiment.dir)
    finally:
        logger.experiment.finish()
        # `finish()` can return before wandb-core has written the run file: wait for the service to stop.
        wandb.teardown()
    assert str(files).startswith(str(tmp_path))
    (run_file,) = files.parent.glob("run-*.wandb")
    _wait_for_exit_record(run_file)
    rows = _history(run_file)

    # The weakness profile: a W&B table per analysis (one per epoch), stored under media/table.
    tables = [r["weakness/profile"] for r in rows if "weakness/profile" in r]
    assert len(tables) == 2, f"logged rows: {[sorted(r) for r in rows]}"
    assert all(t["_type"] == "table-file" for t in tables)
    last = json.loads((files / tables[-1]["path"]).read_text())
    assert last["columns"] == list(WeaknessProfile.TABLE_COLUMNS)
    assert analyzer.profile is not None and len(last["data"]) == tables[-1]["nrows"] > 0
    assert last["data"] == json.loads(json.dumps(analyzer.profile.rows()))

    # Synthetic samples: one image grid per generator at each refresh (every epoch), captioned by generator.
    grids = [r["synth/samples"] for r in rows if "synth/samples" in r]
    assert len(grids) == 2
    for grid in grids:
        assert grid["_type"] == "images/separated" and grid["count"] == 2
        assert sorted(grid["captions"]) == ["scenario", "targeted"]
        for name in grid["filenames"]:
            assert (files / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert grid["width"] == 8 * (8 + 1) + 1  # 8 digits of 8 px per row, 1 px padding
    # The grid shows the samples: white padding (255), dark background and bright strokes of the digits,
    # not the 0/1-out-of-255 black of an unscaled [0, 1] grid.
    from PIL import Image

    pixels = torch.tensor(list(Image.open(files / grids[-1]["filenames"][0]).convert("L").getdata()),
                          dtype=torch.float32)
    assert pixels.max() == 255 and pixels.mean() > 40, (pixels.mean(), pixels.max())
    image = pixels.reshape(grid["height"], grid["width"])
    lines = [i for i in range(grid["height"]) if i % 9]  # every sample, without the padding lines
    samples = image[lines][:, [j for j in range(grid["width"]) if j % 9]]
    assert samples.std() > 30 and (samples < 64).any() and (samples > 128).any(), samples

    # The pictures of the profile: the heatmap and the frontier chart, logged as images and written as PNGs.
    for key in ("weakness/heatmap", "weakness/frontier"):
        logged = [r[key] for r in rows if key in r]
        assert len(logged) == 2, key
        png = files / logged[-1]["filenames"][0]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 300
    written = sorted(p.name for p in (Path(trainer.log_dir) / "lightning_synth").glob("*.png"))
    assert written == ["frontier.png", "profile_epoch0_heatmap.png", "profile_epoch1_heatmap.png"]

    # Scalars from the synthesis callback and the analyzer.
    scalars: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)):
                scalars.setdefault(key, []).append(value)
    assert len(scalars["synth/weight"]) == 2 and all(0 < w <= 2 for w in scalars["synth/weight"])
    assert max(scalars["synth/pool_size"]) >= 128
    assert {"synth/generated/targeted", "synth/mass_synthetic", "trainer/global_step", "val_acc"} <= set(scalars)
    assert all(0 <= e <= 1 for e in scalars["weakness/clean_error"])
    assert any(key.startswith("weakness/perturbation/") for key in scalars)
