"""Logging through whatever loggers the trainer has.

Scalars go through ``pl_module.log_dict`` by the callers; here live the richer artefacts: tables and image
grids for loggers that support them (W&B), and a JSON/text fallback for the rest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

__all__ = ["image_grid", "log_images", "log_profile_pictures", "log_table", "to_uint8_image", "write_json_artifact"]


def log_table(trainer: L.Trainer, key: str, columns: Sequence[str], rows: list[list[Any]]) -> int:
    """Log a table to every logger that has tables (W&B; TensorBoard gets markdown text).

    Returns how many loggers received it. Only rank 0 logs (Lightning's loggers are rank-zero-only).
    """
    if trainer.global_rank != 0:
        return 0
    sent = 0
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=rows, step=trainer.global_step)
            sent += 1
        elif isinstance(logger, TensorBoardLogger):
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)
            logger.experiment.add_text(key, header + body, global_step=trainer.global_step)
            sent += 1
    return sent


def image_grid(images: Tensor, nrow: int = 8, padding: int = 1) -> Tensor:
    """Tile ``(N, C, H, W)`` images in [0, 1] into one ``(C, H', W')`` grid (torchvision-free)."""
    if images.ndim != 4:
        raise ValueError(f"`images` must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = max(min(nrow, n), 1)
    nrows = max((n + ncol - 1) // ncol, 1)
    grid = torch.ones(c, nrows * (h + padding) + padding, ncol * (w + padding) + padding)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i].detach().float().cpu().clamp(0, 1)
    return grid


def to_uint8_image(grid: Tensor) -> Any:
    """A ``(C, H, W)`` image in [0, 1] as an ``(H, W)`` or ``(H, W, 3)`` uint8 numpy array in 0..255.

    Image loggers read a float array as 0..255 values, so a [0, 1] grid would come out black; this scales it.

    Example:
        >>> to_uint8_image(torch.tensor([[[0.0, 0.5, 1.0]]])).tolist()
        [[0, 128, 255]]
    """
    if grid.ndim != 3:
        raise ValueError(f"`grid` must be (C, H, W), got shape {tuple(grid.shape)}")
    pixels = (grid.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        return pixels[0].numpy()
    return pixels[:3].permute(1, 2, 0).contiguous().numpy()


def log_images(trainer: L.Trainer, key: str, grids: dict[str, Tensor]) -> int:
    """Log named ``(C, H, W)`` image grids in [0, 1] (W&B images, TensorBoard images). Returns loggers reached."""
    if trainer.global_rank != 0 or not grids:
        return 0
    sent = 0
    names = sorted(grids)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[to_uint8_image(grids[n]) for n in names], caption=names,
                             step=trainer.global_step)
            sent += 1
        elif isinstance(logger, TensorBoardLogger):
            for n in names:
                logger.experiment.add_image(f"{key}/{n}", grids[n], global_step=trainer.global_step)
            sent += 1
    return sent


def write_json_artifact(trainer: L.Trainer, name: str, payload: Any) -> Path | None:
    """Write ``payload`` as JSON under the trainer's log dir (rank 0), for loggers without tables.

    Call it on every rank: ``trainer.log_dir`` is a collective under DDP. Nothing is written when the trainer
    has no logger (``logger=False``): there is no log dir to put it in.
    """
    if not trainer.loggers:
        return None
    log_dir = trainer.log_dir
    if trainer.global_rank != 0 or log_dir is None:
        return None
    folder = Path(log_dir) / "lightning_synth"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload, indent=2, default=str))
    return path


def log_profile_pictures(trainer: L.Trainer, profile_json: Path, history: Sequence[Any],
                         severities: Sequence[float] | None = None) -> list[Path]:
    """Render the profile heatmap and the frontier-over-epochs chart beside ``profile_json`` (rank 0) and log
    them as images (W&B; TensorBoard gets the heatmap as an image too). Returns the files written; without
    matplotlib, nothing (one warning).
    """
    from lightning_synth.report import MissingMatplotlib, render_frontier_chart, render_heatmap

    if trainer.global_rank != 0 or not history:
        return []
    stem = profile_json.with_suffix("")
    try:
        heatmap = render_heatmap(history[-1], stem.parent / f"{stem.name}_heatmap.png", severities)
        frontier = render_frontier_chart(history, profile_json.parent / "frontier.png")
    except MissingMatplotlib as err:
        if not getattr(log_profile_pictures, "_warned", False):
            setattr(log_profile_pictures, "_warned", True)  # noqa: B010
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(str(err))
        return []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="weakness/heatmap", images=[str(heatmap)], step=trainer.global_step)
            logger.log_image(key="weakness/frontier", images=[str(frontier)], step=trainer.global_step)
    return [heatmap, frontier]
