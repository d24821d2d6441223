"""A devices=N fit with the HTTP control API on; rank 0 PATCHes the budget over HTTP after epoch 0.

Usage: python ddp_control_script.py OUT_DIR DEVICES STRATEGY
Each rank writes the budget its generator was asked for at every refresh, and what the API answered.
"""

import json
import sys
from pathlib import Path

import httpx
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


class ClientOnRankZero(L.Callback):
    """Plays the user with curl: a bad PATCH, a missing token, then a valid PATCH, during training."""

    answers: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        server = trainer.datamodule.server
        if trainer.global_rank != 0 or trainer.current_epoch != 0 or server is None:
            return
        url = f"{server.url}/settings"
        self.answers.append(httpx.patch(url, json={"synthetic_budget": -3}, headers=server.headers).status_code)
        self.answers.append(httpx.patch(url, json={"synthetic_budget": 40}).status_code)
        self.answers.append(httpx.patch(url, content=b"{not json", headers=server.headers).status_code)
        self.answers.append(httpx.patch(url, json={"synthetic_budget": 40}, headers=server.headers).status_code)


if __name__ == "__main__":
    out_dir, devices, strategy = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    generator = CountingAugmentation()
    dm = SyntheticDataModule(DigitsDataModule(batch_size=50), generators=[generator], synthetic_budget=200,
                             serve_api=True, api_token="test-token")
    client = ClientOnRankZero()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[FailureModeCallback(max_samples=50, perturbations=["rotation"]), client],
                        default_root_dir=out_dir)
    trainer.fit(ImageClassifier(num_classes=10, image_size=8, arch="mlp", width=32), datamodule=dm)
    result = {"budgets": generator.budgets, "answers": client.answers, "settings_budget":
              dm.controller.settings.synthetic_budget, "pool": len(dm.pool)}
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo's threads otherwise can abort the interpreter's exit
