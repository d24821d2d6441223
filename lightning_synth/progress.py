"""Progress bars for the long work lightning_synth adds to a run, in the style of the trainer's own bar.

Refreshing the synthetic pool (one step per generator) or fitting a GAN in the loop can take a while, and the
trainer's bar sits still meanwhile. :func:`progress_bar` and :func:`track` show a second bar below it, only
when the trainer shows one (``trainer.progress_bar_callback`` set and enabled) and only on global rank 0:

- with a :class:`~lightning.pytorch.callbacks.RichProgressBar`, a task row in its live display (or a
  transient display with the same columns when it is not running);
- with a :class:`~lightning.pytorch.callbacks.TQDMProgressBar` (or another bar), a ``tqdm`` bar with
  Lightning's format, one line below the training bar, removed when done.

Everywhere else (no trainer, ``enable_progress_bar=False``, another rank) they print nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sized
from types import TracebackType
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.callbacks.progress import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch import nn

__all__ = ["SynthProgress", "progress_bar", "progress_enabled", "track"]

T = TypeVar("T")
TrainerLike = L.Trainer | nn.Module | None


def _trainer_of(source: TrainerLike) -> L.Trainer | None:
    """The trainer behind ``source``: a trainer, a LightningModule attached to one, or ``None``."""
    if source is None or isinstance(source, L.Trainer):
        return source
    if isinstance(source, L.LightningModule):
        return source._trainer  # the public `.trainer` raises when the module is not attached
    if isinstance(source, nn.Module):
        return None
    raise TypeError(f"`trainer` must be a Trainer, a LightningModule or None, got {type(source).__name__}")


def progress_enabled(trainer: TrainerLike) -> bool:
    """Whether a bar would show: the trainer has an enabled progress bar and this is global rank 0.

    Args:
        trainer: a ``Trainer``, a ``LightningModule`` (its trainer is used) or ``None``.

    Raises:
        TypeError: if ``trainer`` is something else.

    Example:
        >>> progress_enabled(L.Trainer(enable_progress_bar=False, logger=False))
        False
        >>> progress_enabled(None)
        False
    """
    found = _trainer_of(trainer)
    if found is None or not found.is_global_zero:
        return False
    bar = found.progress_bar_callback
    # Lightning's own bars have `is_enabled`; a custom ProgressBar without it counts as shown.
    return bar is not None and bool(getattr(bar, "is_enabled", True))


class SynthProgress:
    """A progress bar that follows the trainer's bar; every method is a no-op when it is not shown.

    Use it as a context manager (it closes on exit) or call :meth:`close`. Build it with
    :func:`progress_bar`.

    Args:
        trainer: a ``Trainer``, a ``LightningModule`` (its trainer is used) or ``None`` (silent).
        total: steps to completion (``>= 0``), ``None`` when unknown.
        description: text in front of the bar.

    Raises:
        TypeError: if ``trainer`` or ``description`` has the wrong type.
        ValueError: if ``total`` is negative.

    Example:
        >>> with SynthProgress(None, total=2, description="Synthesis") as bar:
        ...     bar.advance()
        ...     bar.advance(description="Synthesis: gan")
        >>> bar.enabled, bar.completed
        (False, 2)
    """

    _open_tqdm_bars = 0  # nested bars (a GAN's steps inside a refresh) stack one line lower each

    def __init__(self, trainer: TrainerLike, total: int | None, description: str) -> None:
        if total is not None and (isinstance(total, bool) or not isinstance(total, int)):
            raise TypeError(f"`total` must be an int or None, got {type(total).__name__}: {total!r}")
        if total is not None and total < 0:
            raise ValueError(f"`total` must be >= 0, got {total}")
        if not isinstance(description, str):
            raise TypeError(f"`description` must be a str, got {type(description).__name__}: {description!r}")
        found = _trainer_of(trainer)
        self.total, self.description, self.completed = total, description, 0
        self.enabled = progress_enabled(found)
        self._tqdm: Tqdm | None = None
        self._rich: Any = None  # a rich Progress: the trainer's live one, or our own transient one
        self._own_rich = False
        self._task: Any = None
        self._style = ""
        if self.enabled and found is not None:
            self._open(found)

    def _open(self, trainer: L.Trainer) -> None:
        bar = trainer.progress_bar_callback
        if isinstance(bar, RichProgressBar):
            self._open_rich(trainer, bar)
        else:
            self._open_tqdm(bar)

    def _open_rich(self, trainer: L.Trainer, bar: RichProgressBar) -> None:
        from rich.progress import Progress

        live: Any = bar.progress
        if live is None or getattr(bar, "_progress_stopped", False):
            # The trainer's display is not running (outside fit): a transient one with the same columns.
            live = Progress(*bar.configure_columns(trainer), transient=True)
            live.start()
            self._own_rich = True
        self._rich = live
        self._style = f"[{bar.theme.description}]" if bar.theme.description else ""
        self._task = live.add_task(self._style + self.description, total=self.total)

    def _open_tqdm(self, bar: ProgressBar | None) -> None:
        # Below the training bar, like Lightning's validation bar (and below any of ours still open: a GAN's
        # steps inside a refresh), and gone when done.
        position = 2 * getattr(bar, "process_position", 0) + 1 + SynthProgress._open_tqdm_bars
        SynthProgress._open_tqdm_bars += 1
        bar_format = bar.BAR_FORMAT if isinstance(bar, TQDMProgressBar) else TQDMProgressBar.BAR_FORMAT
        self._tqdm = Tqdm(desc=self.description, total=self.total, position=position, leave=False,
                          dynamic_ncols=True, file=sys.stdout, bar_format=bar_format)

    def advance(self, steps: int = 1, description: str | None = None) -> None:
        """Move forward ``steps`` steps, optionally changing the text in front of the bar."""
        self.completed += steps
        if description is not None:
            self.description = description
        if self._tqdm is not None:
            if description is not None:
                self._tqdm.set_description(description)
            self._tqdm.update(steps)
        elif self._rich is not None:
            text = None if description is None else self._style + description
            self._rich.update(self._task, advance=steps, description=text)

    def close(self) -> None:
        """Remove the bar (idempotent)."""
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
            SynthProgress._open_tqdm_bars -= 1
        if self._rich is not None:
            self._rich.remove_task(self._task)
            if self._own_rich:
                self._rich.stop()
            self._rich = None

    def __enter__(self) -> SynthProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def progress_bar(trainer: TrainerLike, total: int | None, description: str) -> SynthProgress:
    """A :class:`SynthProgress` for ``total`` steps; shown only where the trainer shows its own bar.

    Example:
        >>> with progress_bar(None, 3, "GAN steps") as bar:  # no trainer: silent
        ...     for _ in range(3):
        ...         bar.advance()
    """
    return SynthProgress(trainer, total, description)


def track(
    items: Iterable[T],
    trainer: TrainerLike,
    description: str,
    total: int | None = None,
    label: Callable[[T], str] | None = None,
) -> Iterator[T]:
    """Yield ``items`` while a bar counts them (one step each, after the caller's work on the item).

    Args:
        items: what to iterate over.
        trainer: a ``Trainer``, a ``LightningModule`` (its trainer is used) or ``None`` (silent).
        description: text in front of the bar.
        total: number of items (default ``len(items)``, or unknown when ``items`` has no length).
        label: names the item being worked on, shown as ``"<description>: <label>"``.

    Example:
        >>> [x * 2 for x in track(range(3), None, "Synthesis")]
        [0, 2, 4]
    """
    if total is None and isinstance(items, Sized):
        total = len(items)
    with SynthProgress(trainer, total, description) as bar:
        for item in items:
            if label is not None and bar.enabled:
                bar.advance(0, description=f"{description}: {label(item)}")
            yield item
            bar.advance()
