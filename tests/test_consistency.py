import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_synth.callbacks import FailureModeCallback
from lightning_synth.consistency import MixingChains, jsd_consistency
from lightning_synth.datasets import DigitsDataModule
from lightning_synth.profile import Weakness, WeaknessProfile


def _profile(name: str, gap: float, epoch: int = 0) -> WeaknessProfile:
    return WeaknessProfile(epoch=epoch, weaknesses=[
        Weakness(kind="perturbation", name=name, severity=3, error_rate=0.5, gap=gap, support=64)])


def test_jsd_is_zero_for_equal_views_and_grows_with_disagreement():
    logits = torch.randn(8, 10)
    assert float(jsd_consistency(logits, logits, logits)) == pytest.approx(0.0, abs=1e-6)
    near = float(jsd_consistency(logits, logits + 0.1 * torch.randn(8, 10)))
    far = float(jsd_consistency(logits, -logits))
    assert 0 < near < far <= torch.log(torch.tensor(2.0)) + 1e-5


def test_jsd_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least two"):
        jsd_consistency(torch.randn(2, 3))
    with pytest.raises(ValueError, match="one shape"):
        jsd_consistency(torch.randn(2, 3), torch.randn(3, 3))


def test_views_have_the_shape_range_and_differ_from_the_input():
    torch.manual_seed(0)
    images = torch.rand(16, 1, 28, 28)
    views = MixingChains(num_views=3)(images)
    assert len(views) == 3
    for view in views:
        assert view.shape == images.shape and view.min() >= 0 and view.max() <= 1
        assert not torch.equal(view, images)


def test_severities_are_uniform_in_range_and_drive_the_chains():
    chains = MixingChains(["contrast"], max_severity=4.0)
    levels = chains.severities(torch.zeros(4000, dtype=torch.long))
    assert float(levels.min()) >= 0.5 and float(levels.max()) <= 4.0 and abs(float(levels.mean()) - 2.25) < 0.1

    class Mild(MixingChains):  # a subclass draws its own severities: every chain op at the lowest level
        def severities(self, ops):
            return torch.full((len(ops),), 0.5)

    x = torch.rand(64, 1, 8, 8)
    mild, strong = Mild(["contrast"], max_depth=1), MixingChains(["contrast"], max_depth=1, max_severity=5.0)
    strong.severities = lambda ops: torch.full((len(ops),), 5.0)  # type: ignore[method-assign]
    assert (mild.chain(x) - x).abs().mean() < (strong.chain(x) - x).abs().mean()


def test_group_dro_update_tilts_to_weak_perturbations_with_a_floor():
    chains = MixingChains(["rotation", "gaussian_noise", "contrast"], floor=0.5, step=2.0)
    assert torch.allclose(chains.probabilities(), torch.full((3,), 1 / 3))
    for epoch in range(20):
        chains.update(_profile("gaussian_noise", 0.5, epoch))
    probs = chains.probabilities()
    assert probs[1] > 0.6 and float(probs.min()) >= 0.5 / 3 - 1e-6
    assert float(probs.sum()) == pytest.approx(1.0)
    untargeted = MixingChains(["rotation", "gaussian_noise"], floor=1.0)
    untargeted.update(_profile("gaussian_noise", 0.9))
    assert torch.allclose(untargeted.probabilities(), torch.full((2,), 0.5))


def test_state_dict_round_trip():
    chains = MixingChains(["rotation", "gaussian_noise"])
    chains.update(_profile("rotation", 0.4, epoch=3))
    other = MixingChains(["rotation", "gaussian_noise"])
    other.load_state_dict(chains.state_dict())
    assert torch.allclose(other.probabilities(), chains.probabilities()) and other.last_epoch == 3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"width": 0}, "width"), ({"floor": 1.5}, "floor"), ({"alpha": 0.0}, "alpha"),
    ({"max_severity": 9.0}, "max_severity"), ({"perturbations": "rotation"}, "string"),
    ({"perturbations": ["nope"]}, "unregistered"), ({"analyzer": object()}, "`analyzer` must be a FailureModeCallback"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        MixingChains(**kwargs)


class _Net(L.LightningModule):
    def __init__(self, views: MixingChains) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        self.views = views

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(torch.cat([x, *self.views(x)])).chunk(1 + self.views.num_views)
        return F.cross_entropy(logits[0], y) + 12.0 * jsd_consistency(*logits)

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-2)


def test_fit_takes_the_failure_mode_profile(tmp_path):
    torch.manual_seed(0)
    analyzer = FailureModeCallback(["rotation", "gaussian_noise"], max_samples=64)
    views = MixingChains(["rotation", "gaussian_noise"], max_depth=2, analyzer=analyzer)
    trainer = L.Trainer(max_epochs=2, callbacks=[analyzer, views], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(_Net(views), datamodule=DigitsDataModule())
    assert views.last_epoch == 0  # epoch 1 took the profile of epoch 0's validation
    assert not torch.allclose(views.probabilities(), torch.full((2,), 0.5))


def test_without_an_analyzer_the_draw_stays_uniform(tmp_path):
    # Another FailureModeCallback on the trainer is not searched for: the chains follow only the one they got.
    views = MixingChains(["rotation", "gaussian_noise"], max_depth=2)
    trainer = L.Trainer(max_epochs=2, callbacks=[FailureModeCallback(["rotation", "gaussian_noise"], max_samples=64),
                                                 views], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(_Net(views), datamodule=DigitsDataModule())
    assert views.last_epoch is None and torch.allclose(views.probabilities(), torch.full((2,), 0.5))
