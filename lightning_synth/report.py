"""Pictures of a :class:`~lightning_synth.profile.WeaknessProfile`: a heatmap and a frontier chart.

``python -m lightning_synth.report PROFILE.json [MORE.json ...] [--out DIR]`` renders, from saved profiles:

- ``<profile>_heatmap.png``: perturbation x severity, the accuracy gap of each cell (of the last profile);
- ``frontier.png``: each perturbation's failure frontier over the epochs of the profiles given (with a single
  file, every ``profile_epoch*.json`` beside it is read as its history, as the analyzer writes them).

The same pictures are written by :class:`~lightning_synth.FailureModeCallback` beside each profile JSON in the
log dir. Needs matplotlib (``pip install matplotlib``); the rest of the library does not.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_synth.profile import WeaknessProfile

__all__ = ["MissingMatplotlib", "load_history", "main", "render_frontier_chart", "render_heatmap"]


class MissingMatplotlib(ImportError):
    """matplotlib is not installed: the pictures cannot be drawn."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingMatplotlib(
            "lightning_synth's profile pictures need matplotlib: `pip install matplotlib` (the profile JSON "
            "and the logged scalars do not)."
        ) from err
    return plt


def _grid(profile: WeaknessProfile, severities: Sequence[float] | None) -> tuple[list[str], list[float], Any]:
    cells = {(w.name, float(w.severity)): w.gap for w in profile.by_kind("perturbation") if w.severity is not None}
    names = sorted({n for n, _ in cells} | set(profile.frontier))
    levels = sorted({float(s) for s in severities} if severities else {s for _, s in cells})
    values = [[cells.get((n, s), float("nan")) for s in levels] for n in names]
    return names, levels, values


def render_heatmap(profile: WeaknessProfile, path: Path | str, severities: Sequence[float] | None = None) -> Path:
    """Draw perturbation x severity accuracy gaps (red: worse than clean) with the frontier marked.

    Example:
        >>> import tempfile
        >>> from lightning_synth.profile import Weakness
        >>> p = WeaknessProfile(frontier={"rotation": 1.5}, weaknesses=[
        ...     Weakness(kind="perturbation", name="rotation", severity=s, error_rate=0.1 * s, gap=0.1 * s,
        ...              support=64) for s in (1, 2)])
        >>> render_heatmap(p, Path(tempfile.mkdtemp()) / "h.png").stat().st_size > 0
        True
    """
    plt = _pyplot()
    names, levels, values = _grid(profile, severities)
    path = Path(path)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(len(levels), 1), 1.2 + 0.42 * max(len(names), 1)))
    if names and levels:
        image = ax.imshow(values, cmap="RdBu_r", vmin=-0.6, vmax=0.6, aspect="auto")
        for i, row in enumerate(values):
            for j, gap in enumerate(row):
                if gap == gap:  # not NaN
                    ax.text(j, i, f"{gap:+.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(gap) > 0.35 else "black")
            front = profile.frontier.get(names[i])
            if front is not None and levels:
                # severity -> column position, linear between levels
                x = _column(front, levels)
                ax.plot([x, x], [i - 0.45, i + 0.45], color="black", linewidth=2)
        fig.colorbar(image, ax=ax, label="accuracy gap vs clean")
        ax.set_xticks(range(len(levels)), [f"{s:g}" for s in levels])
        ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("severity (black bar: failure frontier)")
    ax.set_title(f"Weakness profile, epoch {profile.epoch} (clean error {profile.clean_error:.3f})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _column(severity: float, levels: Sequence[float]) -> float:
    if severity <= levels[0]:
        return 0.0 - (levels[0] - severity) / max(levels[0], 1e-9) * 0.5
    for j in range(1, len(levels)):
        if severity <= levels[j]:
            return j - 1 + (severity - levels[j - 1]) / (levels[j] - levels[j - 1])
    return float(len(levels) - 1)


def render_frontier_chart(history: Sequence[WeaknessProfile], path: Path | str) -> Path:
    """Draw each perturbation's failure frontier over epochs (a hollow marker at the top: never reached).

    Example:
        >>> import tempfile
        >>> h = [WeaknessProfile(epoch=e, frontier={"rotation": 2.0 + e}) for e in range(3)]
        >>> render_frontier_chart(h, Path(tempfile.mkdtemp()) / "f.png").stat().st_size > 0
        True
    """
    plt = _pyplot()
    path = Path(path)
    names = sorted({n for p in history for n in p.frontier})
    top = max([5.0] + [f for p in history for f in p.frontier.values() if f is not None])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(names):
        colour = plt.get_cmap("tab10")(i % 10)
        xs = [p.epoch for p in history]
        ys = [p.frontier.get(name) for p in history]
        ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", color=colour, label=name)
        never = [x for x, y in zip(xs, ys) if y is None and name in history[xs.index(x)].frontier]
        if never:
            ax.scatter(never, [top + 0.3] * len(never), marker="^", facecolors="none", edgecolors=colour)
    ax.set_xlabel("epoch")
    ax.set_ylabel("failure frontier (severity)")
    ax.set_ylim(0, top + 0.6)
    ax.set_title("Failure frontier per perturbation (higher = more robust; ^ = never reached)", fontsize=9)
    if names:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_history(paths: Sequence[Path | str]) -> list[WeaknessProfile]:
    """Profiles from JSON files, ordered by epoch; one file brings its ``profile_epoch*.json`` siblings."""
    files = [Path(p) for p in paths]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"No profile JSON at {f}")
    if len(files) == 1 and re.fullmatch(r"profile_epoch-?\d+\.json", files[0].name):
        files = sorted(files[0].parent.glob("profile_epoch*.json"))
    profiles = [WeaknessProfile.from_json(f.read_text()) for f in files]
    return sorted(profiles, key=lambda p: p.epoch)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m lightning_synth.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", type=Path, help="profile JSON file(s); the last one is drawn")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: beside the JSON)")
    args = parser.parse_args(argv)
    history = load_history(args.profiles)
    latest = args.profiles[-1]
    out = args.out or latest.parent
    heatmap = render_heatmap(history[-1], out / f"{latest.stem}_heatmap.png")
    frontier = render_frontier_chart(history, out / "frontier.png")
    print(f"wrote {heatmap}\nwrote {frontier}")
    return [heatmap, frontier]


if __name__ == "__main__":
    main()
