"""Style attribution of generations to artists with prototypes: `python -m src.attribute references=DIR
generated=DIR extractor=csd extractor.checkpoint=...` (docs/style.md#style-attribution).

references: one subfolder per artist with real images of that artist. generated: one subfolder per generator or
prompt setting, each with one subfolder per artist it was prompted with (`generated/sd14/seurat/*.png`); a folder
whose subfolders are artists directly is one column named after it. Writes to the run folder:

- gss.csv: per (column, artist) the General Style Similarity with raw and unit prototypes and its 95% bootstrap
  interval over the generated images, the per-image similarity to the prototype (mean, share below 0.5 / above
  0.8) and the share of images attributed to their artist (nearest unit prototype among all artists);
- gss.md: artist x column table of GSS [interval] (`gss` picks raw or unit), shaped like the CSD paper's figure;
- heatmap.png: the same table as a heat map; gallery_<column>.png: per artist, a generated image and its nearest
  reference images (green: the prompted artist's, red: another's);
- metrics.json: means per column, counts, and what was left out (artists without a readable reference, generated
  folders without a matching artist).
"""

import csv
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

import src.utils  # noqa: F401  (registers the config resolvers)
from src.data.images import list_images
from src.metrics.attribution import attribute, general_style_similarity, gss_interval, prototype
from src.nn.embed import embed_images
from src.utils.run import claim_run_dir, instantiate, print_config_tree, resolve_device, save_metrics

log = logging.getLogger(__name__)


def subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}: give a folder with one subfolder per artist")
    return sorted(p for p in folder.iterdir() if p.is_dir())


def generated_columns(folder: Path, artists: set[str]) -> dict[str, Path]:
    """{column name: folder whose subfolders are artists}: `folder` itself when its subfolders are artists,
    else each of its subfolders."""
    inner = subfolders(folder)
    if any(p.name in artists for p in inner):
        return {folder.name: folder}
    return {p.name: p for p in inner}


def embed_folder(
    extractor, folder: Path, args: tuple, desc: str
) -> tuple[torch.Tensor, list[Path], int] | None:
    """(embeddings, the readable files, skipped count) of every image under `folder`, None when none is readable."""
    try:
        paths = list_images(folder)
    except FileNotFoundError:
        return None
    try:
        relative = [str(p.relative_to(folder)) for p in paths]
        features, rows, skipped = embed_images(extractor, folder, relative, *args, desc=desc)
    except RuntimeError:
        return None
    return features, [paths[i].resolve() for i in rows.tolist()], skipped


def attribute_styles(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    claim_run_dir(output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_resolved.yaml")
    if cfg.gss not in ("raw", "unit"):
        raise ValueError(f"gss={cfg.gss!r}: expected raw (mean of the pairwise dot products) or unit")
    device = resolve_device(cfg.device)
    extractor = instantiate(cfg.extractor).to(device).eval()
    args = (cfg.batch_size, cfg.num_workers, device)

    references, excluded = {}, []
    for folder in subfolders(Path(cfg.references)):
        found = embed_folder(extractor, folder, args, f"references {folder.name}")
        if found is None:
            excluded.append(folder.name)
            continue
        references[folder.name] = found
    if excluded:
        log.warning(
            f"{len(excluded)} artist folder(s) without a readable image left out (never averaged as zeros): "
            f"{', '.join(excluded)}"
        )
    if not references:
        raise FileNotFoundError(f"{cfg.references}: no artist subfolder holds a readable image")
    artists = sorted(references)
    prototypes = torch.stack([prototype(references[a][0])["unit"].float() for a in artists])

    rows, unmatched, galleries = [], [], {}
    for column, folder in generated_columns(Path(cfg.generated), set(artists)).items():
        for sub in subfolders(folder):
            if sub.name not in references:
                unmatched.append(f"{column}/{sub.name}")
                continue
            found = embed_folder(extractor, sub, args, f"{column} {sub.name}")
            if found is None:
                unmatched.append(f"{column}/{sub.name} (no readable image)")
                continue
            generated, files, skipped = found
            ref = references[sub.name][0]
            figures = general_style_similarity(ref, generated)
            key = f"gss_{cfg.gss}"
            figures[f"{key}_lo"], figures[f"{key}_hi"] = gss_interval(ref, generated, key, cfg.bootstrap)
            best, _ = attribute(generated, prototypes)
            figures["attributed"] = float((best == artists.index(sub.name)).double().mean())
            figures["skipped"] = float(skipped)
            rows.append({"column": column, "artist": sub.name, **figures})
            galleries.setdefault(column, []).append((sub.name, files[0], generated[0]))
    if unmatched:
        log.warning(f"generated folders without a matching artist (left out): {', '.join(unmatched)}")
    if not rows:
        raise ValueError(
            f"{cfg.generated}: no generated folder is named after an artist of {cfg.references} ({', '.join(artists)})"
        )

    write_tables(rows, output_dir, cfg.gss)
    draw_heatmap(rows, output_dir / "heatmap.png", cfg.gss)
    for column, items in galleries.items():
        draw_gallery(items, references, artists, output_dir / f"gallery_{column}.png", cfg.gallery_k)
    metrics = {"artists": float(len(artists)), "excluded_artists": excluded, "unmatched_folders": unmatched}
    for column in sorted({r["column"] for r in rows}):
        mine = [r for r in rows if r["column"] == column]
        for key in ("gss_raw", "gss_unit", "image_mean", "attributed"):
            metrics[f"{column}/{key}"] = float(np.mean([r[key] for r in mine]))
    save_metrics(metrics, output_dir / "metrics.json")
    return {"rows": rows, **metrics}


def write_tables(rows: list[dict], output_dir: Path, gss: str) -> None:
    keys = [k for k in rows[0] if k not in ("column", "artist")]
    with (output_dir / "gss.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["column", "artist", *keys])
        writer.writerows([[r["column"], r["artist"], *(r[k] for k in keys)] for r in rows])
    columns = list(dict.fromkeys(r["column"] for r in rows))
    artists = list(dict.fromkeys(r["artist"] for r in rows))
    cell = {(r["artist"], r["column"]): r for r in rows}
    key = f"gss_{gss}"
    lines = ["| Artist | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for artist in artists:
        cells = []
        for column in columns:
            r = cell.get((artist, column))
            cells.append("-" if r is None else f"{r[key]:.2f} [{r[f'{key}_lo']:.2f}, {r[f'{key}_hi']:.2f}]")
        lines.append(f"| {artist} | " + " | ".join(cells) + " |")
    text = f"GSS ({gss} prototypes) with 95% bootstrap intervals over the generated images.\n\n" + "\n".join(
        lines
    )
    (output_dir / "gss.md").write_text(text + "\n")
    print(text)


def draw_heatmap(rows: list[dict], path: Path, gss: str) -> None:
    import matplotlib.pyplot as plt

    from src.plots import save_figure

    columns = list(dict.fromkeys(r["column"] for r in rows))
    artists = list(dict.fromkeys(r["artist"] for r in rows))
    grid = np.full((len(artists), len(columns)), np.nan)
    for r in rows:
        grid[artists.index(r["artist"]), columns.index(r["column"])] = r[f"gss_{gss}"]
    fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 2.5, 0.4 * len(artists) + 1.5))
    image = ax.imshow(grid, cmap="viridis", vmin=min(0.0, np.nanmin(grid)), vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(artists)), artists)
    ax.set_title(f"General Style Similarity ({gss} prototypes)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)


def draw_gallery(items, references: dict, artists: list[str], path: Path, k: int) -> None:
    """Per artist: one generated image, then its k nearest reference images over every artist."""
    from src.plots import draw_retrieval_gallery, save_figure

    bank = torch.cat([references[a][0] for a in artists])
    owners = [a for a in artists for _ in references[a][1]]
    files = [f for a in artists for f in references[a][1]]
    query_paths, match_paths, hits, titles = [], [], [], []
    for artist, file, embedding in items:
        order = (bank @ embedding).topk(min(k, len(bank))).indices.tolist()
        query_paths.append(str(file))
        match_paths.append([str(files[i]) for i in order])
        hits.append([owners[i] == artist for i in order])
        titles.append(artist)
    save_figure(draw_retrieval_gallery("/", query_paths, match_paths, hits, titles), path)


@hydra.main(version_base="1.3", config_path="../conf", config_name="attribute.yaml")
def main(cfg: DictConfig) -> None:
    attribute_styles(cfg)


if __name__ == "__main__":
    main()
