"""Issue 12, analyzer side: bad or unusual inputs end in a finished analysis or a clear error."""

import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_synth import FailureModeCallback, WeaknessProfile
from lightning_synth.datasets import load_digits_tensors
from lightning_synth.demos import ImageClassifier

HERE = Path(__file__).parent
PERTS = ["rotation", "gaussian_noise", "brightness"]


def _trained_digits_model():
    torch.manual_seed(0)
    images, labels = load_digits_tensors()
    model = ImageClassifier(num_classes=10, image_size=8, arch="mlp", width=64, lr=1e-2)
    loader = DataLoader(TensorDataset(images[:1200], labels[:1200]), batch_size=100, shuffle=True)
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False).fit(model, loader)
    return model.eval(), images[1200:1600], labels[1200:1600]


class _Mapped(L.LightningModule):
    """Wraps a model trained on [0, 1] images so that it takes the same images in another range/dtype."""

    def __init__(self, inner, low, high, dtype):
        super().__init__()
        self.inner, self.low, self.high, self.dtype_in = inner, low, high, dtype

    def forward(self, x):
        assert x.dtype == self.dtype_in, f"the analyzer changed the input dtype to {x.dtype}"
        return self.inner((x.float() - self.low) / (self.high - self.low))

    def validation_step(self, batch, batch_idx):
        self(batch[0])


def _validate(model, images, labels, tkw, **cb_kwargs):
    cb = FailureModeCallback(perturbations=PERTS, max_samples=256, severities=[1, 3, 5], sequential=False, **cb_kwargs)
    loader = DataLoader(TensorDataset(images, labels), batch_size=100)
    L.Trainer(callbacks=[cb], **tkw()).validate(model, loader, verbose=False)
    return cb.profile


def test_normalised_and_uint8_inputs_give_the_gaps_of_unit_inputs(tkw):
    """Item 9: mean/std-normalised and uint8 inputs are perturbed in [0, 1] and mapped back (dtype kept)."""
    inner, images, labels = _trained_digits_model()
    unit = _validate(_Mapped(inner, 0.0, 1.0, torch.float32), images, labels, tkw)
    mean, std = float(images.mean()), float(images.std())
    normalised = _validate(_Mapped(inner, -mean / std, (1 - mean) / std, torch.float32),
                           (images - mean) / std, labels, tkw)
    as_uint8 = (images * 255).round().to(torch.uint8)
    uint8 = _validate(_Mapped(inner, 0.0, 255.0, torch.uint8), as_uint8, labels, tkw)
    for profile in (normalised, uint8):
        for w in unit.by_kind("perturbation"):
            assert profile.get(w.key).gap == pytest.approx(w.gap, abs=0.03), w.key
    assert unit.get("perturbation/brightness@5").gap > 0.05  # the probes did something


def _tabular_or_token(tkw, inputs):
    labels = torch.arange(len(inputs)) % 3
    data = TensorDataset(inputs, labels)

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.EmbeddingBag(100, 8) if not inputs.is_floating_point() else None
            self.lin = torch.nn.Linear(8 if self.emb is not None else inputs.shape[1], 3)

        def forward(self, x):
            return self.lin(self.emb(x) if self.emb is not None else x)

        def validation_step(self, batch, batch_idx):
            self(batch[0])

    cb = FailureModeCallback(min_support=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(callbacks=[cb], **tkw()).validate(Model(), DataLoader(data, batch_size=16), verbose=False)
    skipped = [w for w in caught if "perturbation probes are skipped" in str(w.message)]
    assert len(skipped) == 1, [str(w.message) for w in caught]
    profile = cb.profile
    assert profile.num_samples == len(inputs) and len(profile.by_kind("class")) == 3
    assert not profile.by_kind("perturbation")


def test_tabular_batches_analyse_classes_and_skip_perturbations_with_one_warning(tkw):
    """Item 10: (B, 20) rows."""
    _tabular_or_token(tkw, torch.randn(64, 20))


def test_token_batches_analyse_classes_and_skip_perturbations_with_one_warning(tkw):
    """Item 10: (B, 32) token ids."""
    _tabular_or_token(tkw, torch.randint(0, 100, (64, 32)))


class _Tiny(L.LightningModule):
    def __init__(self, outputs):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, outputs))

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        self(batch[0])


def test_labels_outside_the_classes_get_a_clear_error(tkw):
    """Item 10: instead of "shape '[10, 10]' is invalid" or a bincount error."""
    images, labels = load_digits_tensors()
    loader = DataLoader(TensorDataset(images[:40], labels[:40] + 5), batch_size=20)
    cb = FailureModeCallback(perturbations=["rotation"], max_samples=8)
    with pytest.raises(ValueError, match=r"labels in \[5, 14\] but the model has 10 classes"):
        L.Trainer(callbacks=[cb], **tkw()).validate(_Tiny(10), loader, verbose=False)


def test_ignore_labels_are_left_out(tkw):
    """Item 10: -100 labels (cross_entropy's ignore_index) are not counted."""
    images, labels = load_digits_tensors()
    labels = labels[:60].clone()
    labels[::3] = -100
    cb = FailureModeCallback(perturbations=["rotation"], max_samples=30, min_support=1)
    L.Trainer(callbacks=[cb], **tkw()).validate(_Tiny(10), DataLoader(TensorDataset(images[:60], labels),
                                                                      batch_size=20), verbose=False)
    assert cb.profile.num_samples == 40
    assert cb.profile.get("perturbation/rotation@5").support == 20  # 30 probed, a third of them ignored


def test_single_logit_binary_model_is_two_classes(tkw):
    """Item 10: a (B, 1) logit is the score of class 1."""
    images, labels = load_digits_tensors()
    binary = (labels[:80] >= 5).long()
    cb = FailureModeCallback(perturbations=["occlusion"], max_samples=40, min_support=1)
    L.Trainer(callbacks=[cb], **tkw()).validate(_Tiny(1), DataLoader(TensorDataset(images[:80], binary),
                                                                     batch_size=20), verbose=False)
    assert cb.profile.num_samples == 80
    assert {w.name for w in cb.profile.by_kind("class")} == {"0", "1"}


def test_empty_class_name_fails_at_construction():
    """Item 10: not after a full epoch."""
    with pytest.raises(ValueError, match="`class_names` must be a sequence of non-empty strings"):
        FailureModeCallback(class_names=["a", "", "c"])


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_counts_padded_samples_once(tmp_path, tkw):
    """Item 11: 97 validation samples on 2 ranks (the sampler pads to 98) give the single-process profile."""
    model = ImageClassifier(num_classes=10, image_size=8, arch="mlp", width=64)
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    script = str(HERE.parent / "callbacks" / "ddp_failure_mode_script.py")
    for devices, strategy, name in ((1, "auto", "single"), (2, "ddp", "ddp")):
        out = tmp_path / name
        out.mkdir()
        subprocess.run([sys.executable, script, str(weights), str(out), str(devices), strategy, "97"], check=True,
                       timeout=300)
    single = WeaknessProfile.from_json((tmp_path / "single" / "profile_rank0.json").read_text())
    rank0 = WeaknessProfile.from_json((tmp_path / "ddp" / "profile_rank0.json").read_text())
    assert single.num_samples == 97 and rank0 == single
