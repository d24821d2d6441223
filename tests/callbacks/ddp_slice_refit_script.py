"""Fit with `SliceBalancedRefit` under DDP and write each rank's refitted last layer.

Usage: python ddp_slice_refit_script.py OUT_DIR DEVICES STRATEGY
"""

import sys
from pathlib import Path

import lightning as L
import torch
from test_slice_refit import LinearDigits, splits
from torch.utils.data import DataLoader, TensorDataset

from lightning_synth.callbacks import SliceBalancedRefit

if __name__ == "__main__":
    out, devices, strategy = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    data = splits()
    held = TensorDataset(*data["heldout"])

    def heldout() -> DataLoader:
        # Each rank reads the held-out data in its own order; the broadcast makes the layers agree anyway.
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return DataLoader(held, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(rank))

    L.seed_everything(0)
    model = LinearDigits()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                        callbacks=[SliceBalancedRefit(heldout, steps=50)], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=out)
    x, y, _ = data["train"]
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    torch.save({"head": model.net[-1].weight.detach().clone(), "body": model.net[1].weight.detach().clone()},
               out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo's threads otherwise can abort the interpreter's exit
