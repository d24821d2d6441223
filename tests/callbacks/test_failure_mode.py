import json
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_synth import BatchAdapter, FailureModeCallback, WeaknessProfile
from lightning_synth.datasets import DictDataset, DigitsDataModule, load_digits_tensors
from lightning_synth.demos import ImageClassifier

HERE = Path(__file__).parent


def _model():
    return ImageClassifier(num_classes=10, image_size=8, arch="mlp", width=64, lr=1e-2)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"unregistered perturbations \['spin'\]"):
        FailureModeCallback(perturbations=["spin"])
    with pytest.raises(ValueError, match="`max_samples` must be >= 0, got -1"):
        FailureModeCallback(max_samples=-1)
    with pytest.raises(TypeError, match="`every_n_epochs` must be an int"):
        FailureModeCallback(every_n_epochs=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`every_n_epochs` must be >= 1"):
        FailureModeCallback(every_n_epochs=0)
    with pytest.raises(ValueError, match=r"`severities` must be integers in 1\.\.5"):
        FailureModeCallback(severities=[0, 6])
    with pytest.raises(ValueError, match="`severities` must be a non-empty"):
        FailureModeCallback(severities=[])
    with pytest.raises(ValueError, match="`frontier_threshold` must be in"):
        FailureModeCallback(frontier_threshold=0)
    with pytest.raises(TypeError, match="`slice_fn` must be callable"):
        FailureModeCallback(slice_fn=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`batch_adapter` must be"):
        FailureModeCallback(batch_adapter="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`quick_reads` must be a bool, got str: 'yes'"):
        FailureModeCallback(quick_reads="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`probe_layout` must be one of .*got 'nhwc'"):
        FailureModeCallback(probe_layout="nhwc")  # type: ignore[arg-type]


def test_rotation_is_a_top_weakness_and_grows_with_severity(tkw):
    """A model trained without rotation has rotation among its top perturbation weaknesses."""
    cb = FailureModeCallback(max_samples=256)
    trainer = L.Trainer(max_epochs=4, callbacks=[cb], **tkw())
    trainer.fit(_model(), datamodule=DigitsDataModule())
    profile = cb.profile
    assert isinstance(profile, WeaknessProfile) and profile.epoch == 3 and len(cb.history) == 4
    scores = profile.perturbation_scores()
    assert "rotation" in sorted(scores, key=scores.get, reverse=True)[:3], scores
    gaps = [profile.get(f"perturbation/rotation@{s}").gap for s in range(1, 6)]
    assert gaps == sorted(gaps) and gaps[-1] > 0.3, gaps
    assert profile.frontier["rotation"] is not None and profile.clean_error < 0.2
    assert len(profile.by_kind("class")) == 10 and profile.by_kind("confusion")
    metrics = trainer.callback_metrics
    assert "weakness/perturbation/rotation@5" in metrics and "weakness/class_recall/3" in metrics


def test_no_extra_forward_for_clean_pass(tkw):
    calls = {"n": 0}
    model = _model()
    model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    cb = FailureModeCallback(max_samples=0, perturbations=["rotation"])
    trainer = L.Trainer(max_epochs=1, limit_train_batches=0, callbacks=[cb], **tkw())
    trainer.validate(model, datamodule=DigitsDataModule(batch_size=100))
    assert calls["n"] == 4  # 400 val samples in batches of 100: the validation loop's own forwards only
    assert cb.profile.num_samples == 400


def test_dict_batches_slices_and_extra_forward_warning(tkw):
    images, labels = load_digits_tensors()
    groups = (labels >= 5).long()
    data = DictDataset(images[:300], labels[:300], group=groups[:300])

    class Model(ImageClassifier):
        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch["image"]), batch["label"])

        def validation_step(self, batch, batch_idx):  # calls the inner net: the callback can't see logits
            self.net(batch["image"])

    cb = FailureModeCallback(max_samples=64, perturbations=["occlusion"], slice_fn=lambda b: {"parity": b["label"] % 2})
    loader = torch.utils.data.DataLoader(data, batch_size=50)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], **tkw())
    with pytest.warns(UserWarning, match="extra forward"):
        trainer.fit(Model(num_classes=10, image_size=8, arch="mlp"), loader, loader)
    names = {w.name for w in cb.profile.by_kind("slice")}
    assert names == {"group=0", "group=1", "parity=0", "parity=1"}
    assert "weakness/worst_group_acc/group" in trainer.callback_metrics


def test_unreadable_batch_gets_clear_error(tkw):
    data = torch.utils.data.TensorDataset(torch.rand(20, 64))
    cb = FailureModeCallback(max_samples=0)

    class Model(ImageClassifier):
        def validation_step(self, batch, batch_idx):
            return None

    loader = torch.utils.data.DataLoader(data, batch_size=10)
    with pytest.raises(TypeError, match="cannot read this batch: list\\(Tensor"):
        L.Trainer(callbacks=[cb], **tkw()).validate(Model(image_size=8, arch="mlp"), loader)
    with pytest.raises(KeyError, match="keys present"):
        FailureModeCallback(batch_adapter=BatchAdapter(input_key="pixels")).adapter.unpack({"x": 1, "y": 2})


def test_missing_validation_set_warns(tkw):
    images, labels = load_digits_tensors()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[:64], labels[:64]), batch_size=32)
    cb = FailureModeCallback()
    with pytest.warns(UserWarning, match="found no validation data"):
        L.Trainer(max_epochs=1, callbacks=[cb], **tkw()).fit(_model(), loader)
    assert cb.profile is None


def test_on_demand_analysis_and_every_n_epochs(tkw):
    cb = FailureModeCallback(every_n_epochs=2, max_samples=32, perturbations=["contrast"])
    dm = DigitsDataModule()
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], **tkw())
    model = _model()
    trainer.fit(model, datamodule=dm)
    assert [p.epoch for p in cb.history] == [1]
    profile = cb.analyze(trainer, model)
    assert profile is cb.profile and len(cb.history) == 2 and profile.num_samples == 400


def test_state_round_trips_through_checkpoint(tmp_path, tkw):
    cb = FailureModeCallback(max_samples=32, perturbations=["rotation"])
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(max_epochs=2, callbacks=[cb, ckpt], **tkw(enable_checkpointing=True))
    trainer.fit(_model(), datamodule=DigitsDataModule())
    restored = FailureModeCallback(max_samples=32, perturbations=["rotation"])
    trainer2 = L.Trainer(max_epochs=2, callbacks=[restored], **tkw())
    trainer2.fit(_model(), datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert restored.history == cb.history and restored.profile == cb.profile


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_profile_identical_on_ranks_and_equal_to_single_process(tmp_path, tkw):
    model = _model()
    L.Trainer(max_epochs=2, **tkw()).fit(model, datamodule=DigitsDataModule(batch_size=50))
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    script = str(HERE / "ddp_failure_mode_script.py")
    for devices, strategy, name in ((1, "auto", "single"), (2, "ddp", "ddp")):
        out = tmp_path / name
        out.mkdir()
        # three analyses: the whole ladder, then passes planned from the last profile (the sequential stop rule)
        subprocess.run([sys.executable, script, str(weights), str(out), str(devices), strategy, "400", "3"],
                       check=True, timeout=300)
    single = WeaknessProfile.from_json((tmp_path / "single" / "profile_rank0.json").read_text())
    rank0 = WeaknessProfile.from_json((tmp_path / "ddp" / "profile_rank0.json").read_text())
    rank1 = WeaknessProfile.from_json((tmp_path / "ddp" / "profile_rank1.json").read_text())
    assert rank0 == rank1
    assert rank0 == single
    states = [json.loads((tmp_path / d / f"prober_rank{r}.json").read_text())
              for d, r in (("single", 0), ("ddp", 0), ("ddp", 1))]
    assert states[0]["analyses"] == 3 and states[0] == states[1] == states[2]
    assert states[0]["moved"] == []  # same weights: the third analysis was a window pass, read precisely
    assert single.num_samples == 400 and 0 < single.get("perturbation/rotation@5").support <= 128


def test_cheaper_probing_keeps_every_cell_and_resumes_its_decisions(tmp_path, tkw):
    """Sequential stopping and frontier windows probe a fraction of the full sweep; unprobed cells keep their
    last measurement, so every profile still has every (perturbation, severity) cell."""
    kwargs = dict(perturbations=["rotation", "gaussian_noise", "brightness"], max_samples=128)
    full = FailureModeCallback(full_sweep_every=1, sequential=False, ladder_search=False, **kwargs)
    L.Trainer(max_epochs=4, callbacks=[full], **tkw()).fit(_model(), datamodule=DigitsDataModule())
    assert full.probe_forwards == 4 * 128 * 3 * 5
    cheap = FailureModeCallback(**kwargs)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(max_epochs=4, callbacks=[cheap, ckpt], **tkw(enable_checkpointing=True))
    trainer.fit(_model(), datamodule=DigitsDataModule())
    assert cheap.probe_forwards < 0.7 * full.probe_forwards, (cheap.probe_forwards, full.probe_forwards)
    for profile in cheap.history:
        assert len(profile.by_kind("perturbation")) == 15
    state = cheap.state_dict()
    restored = FailureModeCallback(**kwargs)
    restored.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][cheap.state_key])
    assert restored.state_dict() == state


class _RGBProbeNet(L.LightningModule):
    """A model of 3-channel 8x8 digits that counts the channels-last inputs it sees: a conv net, or with
    ``view=True`` a linear model that flattens with ``view`` (which needs ``(B, C, H, W)``-contiguous memory)."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        self.view = view
        self.conv, self.head = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 16, 10)
        self.linear = torch.nn.Linear(3 * 64, 10)
        self.channels_last_inputs = 0

    def forward(self, x):
        self.channels_last_inputs += int(not x.is_contiguous())
        if self.view:
            return self.linear(x.view(len(x), -1))
        return self.head(torch.nn.functional.max_pool2d(self.conv(x).relu(), 2).flatten(1))

    def validation_step(self, batch, batch_idx):
        return {"logits": self(batch[0])}


def _rgb_digits_loader():
    images, labels = load_digits_tensors()
    data = torch.utils.data.TensorDataset(images[:256].repeat(1, 3, 1, 1), labels[:256])
    return torch.utils.data.DataLoader(data, batch_size=64)


def _probe_gaps(model, layout, tkw):
    cb = FailureModeCallback(max_samples=128, perturbations=["rotation", "contrast"], probe_layout=layout)
    L.Trainer(callbacks=[cb], **tkw()).validate(model, _rgb_digits_loader(), verbose=False)
    return [(w.name, w.severity, w.error_rate) for w in cb.profile.by_kind("perturbation")]


def test_probe_layout_channels_last_on_cpu_gives_the_same_profile(tkw):
    """"auto" scores the probe images channels-last on the CPU (faster for conv nets), with the same profile."""
    torch.manual_seed(0)
    model = _RGBProbeNet(view=False)
    preserved = _probe_gaps(model, "preserve", tkw)
    assert model.channels_last_inputs == 0
    assert _probe_gaps(model, "auto", tkw) == preserved
    assert model.channels_last_inputs > 0  # the probe forwards; the validation step's own inputs stay as they come


def test_probe_layout_falls_back_when_the_forward_needs_contiguous_memory(tkw):
    torch.manual_seed(0)
    model = _RGBProbeNet(view=True)
    preserved = _probe_gaps(model, "preserve", tkw)
    with pytest.warns(UserWarning, match="failed on channels-last probe images"):
        assert _probe_gaps(model, "auto", tkw) == preserved
    with pytest.raises(RuntimeError, match="view"):
        _probe_gaps(model, "channels_last", tkw)


def test_probe_layout_fallback_survives_a_resume(tkw):
    """A resumed run keeps the fallback: no second failed forward, no second warning."""
    torch.manual_seed(0)
    model = _RGBProbeNet(view=True)
    first = FailureModeCallback(max_samples=64, perturbations=["contrast"])
    with pytest.warns(UserWarning, match="failed on channels-last probe images"):
        L.Trainer(callbacks=[first], **tkw()).validate(model, _rgb_digits_loader(), verbose=False)
    assert first.state_dict()["tap"] == {"layout_failed": True}
    resumed = FailureModeCallback(max_samples=64, perturbations=["contrast"])
    resumed.load_state_dict(first.state_dict())
    attempts = model.channels_last_inputs
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*channels-last probe images")
        L.Trainer(callbacks=[resumed], **tkw()).validate(model, _rgb_digits_loader(), verbose=False)
    assert model.channels_last_inputs == attempts  # every probe forward took the batch's own layout
    assert resumed.state_dict()["tap"] == {"layout_failed": True}
    assert FailureModeCallback().state_dict()["tap"] == {"layout_failed": False}
