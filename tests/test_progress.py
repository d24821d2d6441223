import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lightning_synth.data import SyntheticDataModule
from lightning_synth.datasets import DigitsDataModule
from lightning_synth.demos import ImageClassifier
from lightning_synth.progress import SynthProgress, progress_bar, progress_enabled, track


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="`total` must be >= 0, got -1"):
        progress_bar(None, -1, "x")
    with pytest.raises(TypeError, match="`total` must be an int or None, got str"):
        progress_bar(None, "3", "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`total` must be an int or None, got bool"):
        progress_bar(None, True, "x")
    with pytest.raises(TypeError, match="`description` must be a str, got int"):
        progress_bar(None, 3, 7)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`trainer` must be a Trainer, a LightningModule or None, got str"):
        progress_bar("trainer", 3, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`trainer` must be a Trainer"):
        progress_enabled(42)  # type: ignore[arg-type]


def _trainer(tmp_path, **kwargs):
    kwargs.setdefault("enable_progress_bar", True)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=tmp_path, **kwargs)


def test_on_when_the_trainers_tqdm_bar_is_on(tmp_path, capsys):
    trainer = _trainer(tmp_path, callbacks=[TQDMProgressBar()])
    assert progress_enabled(trainer)
    with progress_bar(trainer, 2, "Synthesis") as bar:
        assert bar.enabled
        bar.advance(description="Synthesis: targeted")
        bar.advance()
    assert bar.completed == 2 and bar._tqdm is None  # closed
    assert "Synthesis: targeted" in capsys.readouterr().out


def test_off_when_the_trainers_bar_is_off_or_not_rank_zero(tmp_path, capsys, monkeypatch):
    silent = [
        None,
        _trainer(tmp_path, enable_progress_bar=False),
        _trainer(tmp_path, callbacks=[TQDMProgressBar(refresh_rate=0)]),  # Lightning's way to disable a bar
        ImageClassifier(),  # a module not attached to a trainer
    ]
    for source in silent:
        assert not progress_enabled(source)
        with progress_bar(source, 3, "Synthesis") as bar:
            bar.advance(3, description="Synthesis: gan")
        assert not bar.enabled and bar.completed == 3
        assert list(track([1, 2], source, "Synthesis", label=str)) == [1, 2]
    shown = _trainer(tmp_path)
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    assert not progress_enabled(shown)
    with progress_bar(shown, 1, "Synthesis") as bar:
        bar.advance()
    captured = capsys.readouterr()
    assert "Synthesis" not in captured.out + captured.err


def test_module_follows_its_trainer_and_rich_bar_outside_fit(tmp_path):
    trainer = _trainer(tmp_path, callbacks=[RichProgressBar()])
    model = ImageClassifier()
    model.trainer = trainer
    assert progress_enabled(model)
    # Outside fit the trainer's rich display is not running: a transient one with the same columns is used.
    bar = SynthProgress(model, 2, "GAN steps")
    assert bar.enabled and bar._own_rich and bar._rich.live.is_started
    bar.advance(2)
    live = bar._rich
    bar.close()
    bar.close()  # idempotent
    assert not live.live.is_started and bar._rich is None


def _fit(tmp_path, bar, enable_progress_bar=True):
    dm = SyntheticDataModule(DigitsDataModule(val_size=300), synthetic_budget=64, real_cache_size=128)
    callbacks = [bar] if bar is not None else []
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
                       callbacks=callbacks, enable_progress_bar=enable_progress_bar)
    trainer.fit(ImageClassifier(image_size=8, arch="mlp", width=16), datamodule=dm)
    return trainer


def test_refresh_shows_one_step_per_generator_only_with_the_trainers_bar(tmp_path, capsys, monkeypatch):
    _fit(tmp_path, TQDMProgressBar())
    out = capsys.readouterr().out
    assert "Synthesis: targeted" in out and "Synthesis: scenario" in out and "2/2" in out

    _fit(tmp_path, None, enable_progress_bar=False)
    captured = capsys.readouterr()
    assert "Synthesis" not in captured.out + captured.err

    # With a rich bar the refresh is a task row in the trainer's own live display.
    opened: list[tuple[bool, bool]] = []
    original = SynthProgress._open_rich

    def spy(self, trainer, bar):
        original(self, trainer, bar)
        opened.append((self._rich is bar.progress, self._own_rich))

    monkeypatch.setattr(SynthProgress, "_open_rich", spy)
    _fit(tmp_path, RichProgressBar())
    assert opened == [(True, False)]


def test_nested_tqdm_bars_stack_below_each_other(tmp_path):
    trainer = _trainer(tmp_path, callbacks=[TQDMProgressBar()])
    with progress_bar(trainer, 2, "Synthesis") as outer, progress_bar(trainer, 5, "GAN steps") as inner:
        assert outer._tqdm is not None and inner._tqdm is not None
        assert (outer._tqdm.pos, inner._tqdm.pos) == (-1, -2)  # tqdm keeps fixed positions negated
    assert SynthProgress._open_tqdm_bars == 0
