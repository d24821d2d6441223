"""Fit with SyntheticDataModule and write each rank's pool/weights as JSON.

Usage: python ddp_synthetic_script.py OUT_DIR DEVICES STRATEGY
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_synth import FailureModeCallback, SyntheticDataModule, TargetedAugmentation
from lightning_synth.datasets import DigitsDataModule
from lightning_synth.demos import ImageClassifier


class CountingAugmentation(TargetedAugmentation):
    budgets: list[int] = []

    def generate(self, profile, budget, context):
        self.budgets.append(budget)
        return super().generate(profile, budget, context)


if __name__ == "__main__":
    out_dir, devices, strategy = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    L.seed_everything(0)
    generator = CountingAugmentation()
    dm = SyntheticDataModule(DigitsDataModule(batch_size=50), generators=[generator], synthetic_budget=200,
                             max_pool_samples=1000)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[FailureModeCallback(max_samples=100, perturbations=["rotation", "contrast"])],
                        default_root_dir=out_dir)
    trainer.fit(ImageClassifier(num_classes=10, image_size=8, arch="mlp", width=64), datamodule=dm)
    pool = dm.pool
    result = {
        "pool_size": len(pool),
        "sample_ids": pool.sample_ids.tolist(),
        "inputs_sum": float(sum(pool[i][0].double().sum() for i in range(len(pool)))),
        "targets": [int(pool[i][1]) for i in range(len(pool))],
        "weight": dm.weighting.weight,
        "probabilities_sum_sq": float((dm.sampler.probabilities() ** 2).sum()),
        "local_budgets": generator.budgets,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo's threads otherwise can abort the interpreter's exit
