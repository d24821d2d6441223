import subprocess
import sys

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from lightning_synth import FailureModeCallback
from lightning_synth.datasets import DigitsDataModule
from lightning_synth.demos import ImageClassifier
from lightning_synth.report import load_history, main


def test_fit_writes_pictures_beside_the_profile_and_report_renders_them_again(tmp_path, tkw):
    cb = FailureModeCallback(perturbations=["rotation", "gaussian_noise"], max_samples=64)
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], **tkw(logger=CSVLogger(tmp_path)))
    trainer.fit(ImageClassifier(image_size=8, arch="mlp", width=32, lr=1e-2), datamodule=DigitsDataModule())
    folder = tmp_path / "lightning_logs" / "version_0" / "lightning_synth"
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "frontier.png", "profile_epoch0_heatmap.png", "profile_epoch1_heatmap.png"]

    out = tmp_path / "report"
    written = main([str(folder / "profile_epoch1.json"), "--out", str(out)])
    assert [p.name for p in written] == ["profile_epoch1_heatmap.png", "frontier.png"]
    heatmap = Image.open(out / "profile_epoch1_heatmap.png").convert("RGB")
    colours = {heatmap.getpixel((x, y)) for x in range(0, heatmap.size[0], 7) for y in range(0, heatmap.size[1], 7)}
    assert len(colours) > 20  # a drawn heatmap, not a blank canvas
    history = load_history([folder / "profile_epoch1.json"])  # one file brings its siblings as history
    assert [p.epoch for p in history] == [0, 1] and history[-1] == cb.profile

    done = subprocess.run([sys.executable, "-m", "lightning_synth.report", str(folder / "profile_epoch0.json"),
                           "--out", str(tmp_path / "cli")], capture_output=True, text=True, check=True)
    assert "frontier.png" in done.stdout and (tmp_path / "cli" / "profile_epoch0_heatmap.png").stat().st_size > 0


def test_missing_profile_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No profile JSON at"):
        load_history([tmp_path / "nope.json"])
