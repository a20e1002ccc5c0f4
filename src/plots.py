"""Figures of the project: image grids and galleries, similarity histograms, complexity scatter plots.

Every function returns a matplotlib figure (or a PIL image) and leaves saving and closing to the caller. The Agg
backend is selected so that training runs and scripts without a display can draw; a notebook switches back with
`%matplotlib inline`.
"""

import logging
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from src.data.images import load_rgb

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)

# Bin width of the similarity histograms on [0, 1] (the DCR figures' resolution,
# docs/replication.md#report-and-histogram).
BIN_WIDTH = 0.005
COMPLEXITY_LABELS = {
    "entropy": "grey-level entropy (nats)",
    "jpeg_kb": "JPEG-90 size (KB)",
    "tv": "total variation",
}


def image_grid(images: torch.Tensor, columns: int = 8) -> Image.Image:
    """uint8 (B, H, W, C) -> one PIL image, `columns` per row, 2 px white gutters."""
    b, h, w, c = images.shape
    rows = -(-b // columns)
    grid = np.full((rows * (h + 2), min(b, columns) * (w + 2), c), 255, dtype=np.uint8)
    for i, image in enumerate(images.numpy()):
        r, col = divmod(i, columns)
        grid[r * (h + 2) : r * (h + 2) + h, col * (w + 2) : col * (w + 2) + w] = image
    return Image.fromarray(grid.squeeze(-1) if c == 1 else grid)


def draw_image_rows(rows: list[list[tuple]], row_labels: list[str], thumb: int = 96):
    """A grid of images: rows[r] = [(path, title, frame colour), ...]; an unreadable image leaves its cell empty.
    Returns (figure, number of unreadable images).

    The cells are composed into one image drawn on one axes (titles and row labels as text), which draws in a
    fraction of the time of one axes per image (a 8 x 6 gallery: about 0.2 s instead of 2 s).
    """
    from matplotlib.colors import to_rgb

    cols = max(len(r) for r in rows)
    frame, gap, title_px = 3, 4, 14
    cell_w, cell_h = thumb + 2 * frame + gap, thumb + 2 * frame + gap + title_px
    canvas = np.full((len(rows) * cell_h, cols * cell_w, 3), 255, dtype=np.uint8)
    texts, unreadable = [], 0
    for r, cells in enumerate(rows):
        for c, (path, title, colour) in enumerate(cells):
            top, left = r * cell_h + title_px, c * cell_w
            rgb = (np.array(to_rgb(colour)) * 255).astype(np.uint8)
            canvas[top : top + thumb + 2 * frame, left : left + thumb + 2 * frame] = rgb
            inner = canvas[top + frame : top + frame + thumb, left + frame : left + frame + thumb]
            try:
                inner[:] = np.asarray(load_rgb(path).resize((thumb, thumb)))
            except Exception:  # noqa: BLE001 - a figure shows an empty cell rather than failing; counted
                inner[:] = 255
                unreadable += 1
            if title:
                texts.append((left + frame + thumb / 2, top - 2, title))
    fig, ax = plt.subplots(figsize=(1.45 * cols, 1.6 * len(rows)))
    ax.imshow(canvas, interpolation="nearest")
    for x, y, title in texts:
        ax.text(x, y, title, fontsize=7, ha="center", va="bottom")
    ax.set_xticks([])
    ax.set_yticks(
        [r * cell_h + title_px + frame + thumb / 2 for r in range(len(rows))], row_labels, fontsize=8
    )
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout()
    return fig, unreadable


def draw_retrieval_gallery(root, query_paths, match_paths, hits, titles=None, thumb: int = 96):
    """One row per query: the query (black frame, titled with `titles[r]`), then its ranked matches framed green
    (hit) or red (miss). Paths are relative to `root` (or absolute); hits: (Q, K) bool.

    Unreadable images leave their cell empty and are counted in a warning. Returns the figure.
    """
    rows = [
        [(Path(root) / query, "" if titles is None else titles[r], "black")]
        + [
            (Path(root) / path, "", "tab:green" if hit else "tab:red")
            for path, hit in zip(match_paths[r], hits[r], strict=True)
        ]
        for r, query in enumerate(query_paths)
    ]
    fig, unreadable = draw_image_rows(rows, ["query"] + [""] * (len(rows) - 1), thumb)
    if unreadable:
        log.warning(
            f"retrieval gallery: {unreadable} image(s) under '{root}' are unreadable; their cells are empty"
        )
    return fig


def plot_similarity_histograms(ax, series, threshold: float, histtype: str = "bar") -> None:
    """Density histograms of similarity vectors on `ax`: [0, 1] in bins of `BIN_WIDTH`, and the threshold.

    series: (values, label, colour) in drawing order; values None are left out. Similarities below 0 (possible
    for pixel correlations) are counted in the first bin and the legend says how many, so no value is dropped.
    histtype "stepfilled" draws each series as one polygon instead of 200 bars: the same shape, about ten times
    faster (the replication report, drawn for every analysis, uses it).
    """
    bins = np.linspace(0.0, 1.0, round(1 / BIN_WIDTH) + 1)
    for values, label, colour in series:
        if values is None:
            continue
        values = torch.as_tensor(values).double().cpu().numpy()
        below = int((values < 0).sum())
        label = f"{label} (n={len(values)})" + (f", {below} < 0 in the first bin" if below else "")
        ax.hist(
            np.clip(values, 0.0, 1.0),
            bins=bins,
            alpha=0.6,
            color=colour,
            label=label,
            density=True,
            histtype=histtype,
        )
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    ax.set_xlim(0, 1), ax.legend(fontsize=7)


def draw_similarity_histogram(series, threshold: float, title: str = ""):
    """One panel of `plot_similarity_histograms`: e.g. top-1 sim(gen, train) against the training set's own
    nearest-other similarities (the replication report), or against held-out control images."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    plot_similarity_histograms(ax, series, threshold, histtype="stepfilled")
    ax.set_xlabel("similarity"), ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def draw_complexity(top1, complexity: dict, correlations: dict):
    """One scatter panel per complexity measure: the matched training image's complexity (x) against the
    generation's top-1 similarity (y), titled with Pearson r and its p-value (DCR `simplicityscatter_*.png`)."""
    top1 = torch.as_tensor(top1).double().cpu().numpy()
    fig, axes = plt.subplots(1, len(complexity), figsize=(4 * len(complexity), 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], complexity.items(), strict=True):
        ax.scatter(values, top1, s=8, alpha=0.6)
        ax.set_xlabel(COMPLEXITY_LABELS.get(name, name)), ax.set_ylabel("top-1 sim(gen, train)")
        ax.set_title(f"r={correlations[f'cc_{name}']:.3f}, p={correlations[f'pval_{name}']:.2g}", fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Write `fig` to `path` (parent folders created) and close it. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
