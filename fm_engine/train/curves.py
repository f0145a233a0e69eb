"""``OUT/curves.png``: a training run's metrics against step, one panel per quantity.

Panels: the loss terms (total, JEPA, contrastive, probe), probe accuracy (training batch, and held-out when
``probe_data`` is set), learning rate, images/s, and memory (GiB). Written by the training loop at every
checkpoint and at the end; ``python -m fm_engine.train.curves OUT`` redraws it from ``OUT/metrics.csv``.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import tempfile
from pathlib import Path

PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "jepa_loss", "contrastive_loss", "probe_loss")),
    ("probe accuracy", ("probe_acc", "probe_acc_heldout")),
    ("learning rate", ("lr",)),
    ("images/s", ("images_per_s",)),
    ("memory (GiB)", ("memory_gib",)),
)


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_metrics(path: str | os.PathLike[str]) -> dict[str, list[float]]:
    """Columns of a metrics.csv as floats (NaN where a row has no value)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = list(rows[0]) if rows else []
    return {k: [_number(r.get(k, "")) for r in rows] for k in keys}


def plot_curves(metrics_csv: str | os.PathLike[str], png: str | os.PathLike[str]) -> Path:
    """Draw ``png`` from ``metrics_csv`` (replaced atomically). ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = read_metrics(metrics_csv)
    steps = cols.get("step", [])
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(7, 2.2 * len(PANELS)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], PANELS, strict=True):
        for k in keys:
            ys = cols.get(k)
            if ys and any(not math.isnan(y) for y in ys):
                pts = [(x, y) for x, y in zip(steps, ys) if not math.isnan(y)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None, label=k)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if ax.lines and len(keys) > 1:
            ax.legend(fontsize=7, loc="best")
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{Path(metrics_csv).parent.name}: {len(steps)} rows", fontsize=9)
    fig.tight_layout()
    png = Path(png)
    fd, tmp = tempfile.mkstemp(dir=png.parent, prefix=f".{png.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600
    os.replace(tmp, png)
    return png


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    print(plot_curves(out / "metrics.csv", out / "curves.png"))
