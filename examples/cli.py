# Run: python examples/cli.py fit --config examples/cli_config.yaml
"""lightning_synth from a LightningCLI config: model, wrapped datamodule, generators, callbacks, logger.

Every part is built by jsonargparse from ``examples/cli_config.yaml``: the ``ImageClassifier``, the
``SyntheticDataModule`` wrapping a ``FashionMNISTDataModule`` (nested ``class_path``/``init_args``), its
generators, the ``FailureModeCallback`` and ``AdaptiveSampling`` callbacks and a ``CSVLogger``. Override any
value on the command line, e.g. ``--trainer.max_epochs=2 --data.synthetic_budget=512``, or print the full
config with ``python examples/cli.py fit --config examples/cli_config.yaml --print_config``.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI

from lightning_synth.data import SyntheticDataModule
from lightning_synth.demos import ImageClassifier


def main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` replaces ``sys.argv[1:]`` (used by the tests)."""
    return LightningCLI(
        ImageClassifier,
        SyntheticDataModule,
        seed_everything_default=0,
        args=args,
        run=run,
        # One config file per run, next to the logs; re-running into the same folder must not fail.
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
