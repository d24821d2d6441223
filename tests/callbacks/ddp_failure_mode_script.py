"""Run FailureModeCallback under `trainer.validate` and write each rank's profile as JSON.

Usage: python ddp_failure_mode_script.py WEIGHTS OUT_DIR DEVICES STRATEGY [VAL_SIZE] [ANALYSES]

With ANALYSES > 1 the same callback validates that many times (the later passes are planned from the last
profile) and each rank also writes the prober's decision state (``prober_rank<r>.json``).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_synth import FailureModeCallback
from lightning_synth.datasets import DigitsDataModule
from lightning_synth.demos import ImageClassifier

if __name__ == "__main__":
    weights, out_dir, devices, strategy = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    val_size = int(sys.argv[5]) if len(sys.argv) > 5 else 400
    analyses = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    model = ImageClassifier(num_classes=10, image_size=8, arch="mlp", width=64)
    model.load_state_dict(torch.load(weights))
    callback = FailureModeCallback(perturbations=["rotation", "gaussian_noise", "occlusion"], max_samples=128,
                                   severities=[1, 3, 5])
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False, callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out_dir)
    for _ in range(analyses):
        trainer.validate(model, datamodule=DigitsDataModule(batch_size=50, val_size=val_size))
    (out_dir / f"profile_rank{trainer.global_rank}.json").write_text(callback.profile.to_json())
    (out_dir / f"prober_rank{trainer.global_rank}.json").write_text(json.dumps(callback.prober.state_dict()))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo's threads otherwise can abort the interpreter's exit
