"""Score a descriptor on a query/database benchmark: style retrieval (`python -m src.evaluate extractor=clip_vitb16
benchmark=wikiart`), copy detection (`python -m src.evaluate extractor=pixels_channel benchmark=planted_copies`) or
retrieval of partial copies (`python -m src.evaluate extractor=pixels benchmark=copy_segmix`).

Any extractor of conf/extractor/ (a trained CSD checkpoint: `extractor=csd extractor.checkpoint=...`) on any benchmark
of conf/benchmark/. Writes `metrics.json`, a markdown row (retrieval: shaped like the CSD paper's Table 1,
docs/style.md#table-1; copy detection: the figures of `src.metrics.copy_detection` with their bootstrap intervals,
docs/replication.md#scoring-a-copy-detector) and, with `save_embeddings=true`, `embeddings.npz`, which
`embeddings=<file>` re-scores later without the images.

Copy detection and partial copies by region matching (docs/replication.md#region-matching):
`region_scales=[0.85,0.7,0.55] region_grid=4` embeds every image with its regions and scores an image pair by its
best whole-to-region match.
"""

import logging
import math
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

import src.utils  # noqa: F401  (registers the config resolvers)
from src.data.style.retrieval import RetrievalSet
from src.metrics import copy_detection_metrics, partial_copy_metrics, retrieval_metrics
from src.nn.embed import embed_images
from src.utils.checks import check_number
from src.utils.embeddings import load_embeddings, save_embeddings
from src.utils.run import claim_run_dir, instantiate, print_config_tree, resolve_device, save_metrics

log = logging.getLogger(__name__)


def fit_pca(features: torch.Tensor, dims: int):
    """Fit a PCA with faiss (as the official VGG Gram baseline, docs/style.md#evaluation-protocol); returns x
    -> L2-normalised projection."""
    import faiss

    dims = min(dims, features.shape[1], features.shape[0])
    pca = faiss.PCAMatrix(features.shape[1], dims)
    pca.train(np.ascontiguousarray(features.numpy(), dtype=np.float32))
    return lambda x: F.normalize(
        torch.from_numpy(pca.apply(np.ascontiguousarray(x.numpy(), np.float32))), dim=-1
    )


def pca_reduce(query: torch.Tensor, database: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a PCA on the database embeddings, project both sets and L2-normalise."""
    project = fit_pca(database, dims)
    return project(query), project(database)


def table_row(name: str, metrics: dict, ks=(1, 10, 100)) -> str:
    """One markdown row in Table 1's order: mAP@k then Recall@k, in percent."""
    cells = [f"{100 * metrics[f'mAP@{k}']:.2f}" for k in ks] + [
        f"{100 * metrics[f'recall@{k}']:.2f}" for k in ks
    ]
    return f"| {name} | " + " | ".join(cells) + " |"


def copy_table_row(name: str, metrics: dict, thresholds=()) -> tuple[str, str]:
    """Header and row of a copy-detection result: uAP, recall at precision 0.9 and its threshold, mAP@100 and
    precision / recall at each threshold, in percent with 95% bootstrap intervals where computed ("-" where a
    figure does not exist, e.g. the threshold when no threshold reaches precision 0.9)."""

    def finite(key: str) -> bool:  # an unreached precision leaves no threshold (inf; null in metrics.json)
        return metrics.get(key) is not None and math.isfinite(metrics[key])

    def cell(key: str, percent: bool = True) -> str:
        if not finite(key):
            return "-"
        scale = 100 if percent else 1
        value = f"{scale * metrics[key]:.1f}" if percent else f"{metrics[key]:.3f}"
        if finite(f"{key}_lo") and finite(f"{key}_hi"):
            lo, hi = scale * metrics[f"{key}_lo"], scale * metrics[f"{key}_hi"]
            value += f" [{lo:.1f}, {hi:.1f}]" if percent else f" [{lo:.3f}, {hi:.3f}]"
        return value

    keys = ["uAP", "recall@p90"] + [f"{m}@{t:g}" for t in thresholds for m in ("precision", "recall")]
    header = "| Method | " + " | ".join(keys + ["threshold@p90", "mAP@100"]) + " |"
    cells = [cell(k) for k in keys] + [cell("threshold@p90", percent=False)]
    cells.append(f"{100 * metrics['mAP@100']:.1f}" if "mAP@100" in metrics else "-")
    return header, f"| {name} | " + " | ".join(cells) + " |"


def partial_copy_row(name: str, metrics: dict, ks=(1, 4, 10)) -> tuple[str, str]:
    """Header and row of a partial-copy result: mAP, MRR, precision@k and recall@k in percent, with the 95%
    bootstrap intervals of mAP and MRR."""
    keys = ["mAP", "MRR"] + [f"precision@{k}" for k in ks] + [f"recall@{k}" for k in ks]
    cells = []
    for key in keys:
        cell = f"{100 * metrics[key]:.1f}"
        if key in ("mAP", "MRR") and f"{key}_lo" in metrics:
            cell += f" [{100 * metrics[f'{key}_lo']:.1f}, {100 * metrics[f'{key}_hi']:.1f}]"
        cells.append(cell)
    return "| Method | " + " | ".join(keys) + " |", f"| {name} | " + " | ".join(cells) + " |"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    output_dir = Path(cfg.paths.output_dir)
    for k in cfg.ks:
        check_number("ks", k, low=1, integer=True)
    check_number("batch_size", cfg.batch_size, low=1, integer=True)
    check_number("pca_dims", cfg.get("pca_dims"), low=1, integer=True, allow_none=True)
    claim_run_dir(output_dir)
    print_config_tree(cfg, save_to=output_dir / "config_resolved.yaml")
    name = cfg.get("name") or cfg.run_name
    scales = tuple(cfg.get("region_scales") or ())
    regions = (scales, cfg.get("region_grid", 4)) if scales else None
    if regions and cfg.get("pca_dims"):
        raise ValueError(
            "region_scales and pca_dims together are not supported: set one of them ([] / null)."
        )
    if cfg.get("embeddings"):
        saved = load_embeddings(cfg.embeddings)
        query, database = saved["query"], saved["database"]
        query_labels, database_labels = saved["query_labels"], saved["database_labels"]
        task, chunks = saved["task"], saved["split_chunks"]
        log.info(f"Re-scoring {cfg.embeddings}: {len(query)} queries, {len(database)} database images")
    else:
        device = resolve_device(cfg.device)
        rset: RetrievalSet = hydra.utils.instantiate(cfg.benchmark)
        task = rset.task
        if regions and task not in ("copy_detection", "partial_copy"):
            raise ValueError(
                f"region_scales={list(scales)}: region matching scores copy-detection and partial-copy benchmarks "
                f"(benchmark=planted_copies, copy_segmix, ...); this one is a {task} benchmark. Set region_scales=[]."
            )
        extractor = instantiate(cfg.extractor).to(device).eval()
        chunks = getattr(extractor, "split_chunks", 1)
        if regions and chunks > 1:
            raise ValueError(
                f"{name} gives token features for the split-product similarity; region matching compares global "
                "descriptors: set region_scales=[] or use a pooled extractor."
            )
        args = (cfg.batch_size, cfg.num_workers, device)
        project = None
        if cfg.get("pca_dims"):
            # Fit on a random sample of the database first, then keep only reduced embeddings: wide descriptors
            # (VGG Gram: 131k dims) of a whole WikiArt would not fit in memory (~42 GB for 80k images).
            sample = torch.randperm(len(rset.database), generator=torch.Generator().manual_seed(0))
            sample = [rset.database[i] for i in sample[: cfg.pca_fit_images].tolist()]
            project = fit_pca(
                embed_images(extractor, rset.root, sample, *args, desc="PCA sample")[0], cfg.pca_dims
            )
        query, q_rows, q_skip = embed_images(
            extractor, rset.root, rset.query, *args, desc="query", project=project, regions=regions
        )
        database, d_rows, d_skip = embed_images(
            extractor, rset.root, rset.database, *args, desc="database", project=project, regions=regions
        )
        if q_skip or d_skip:
            log.warning(
                f"Skipped unreadable images: {q_skip} queries, {d_skip} database images (left out of scoring)."
            )
        query_labels, database_labels = rset.query_labels[q_rows], rset.database_labels[d_rows]
        if cfg.save_embeddings:
            path = save_embeddings(
                output_dir / "embeddings.npz",
                query,
                database,
                query_labels,
                database_labels,
                rset.label_names,
                [rset.query[i] for i in q_rows.tolist()],
                [rset.database[i] for i in d_rows.tolist()],
                root=rset.root,
                descriptor=name,
                half=cfg.half_embeddings,
                task=task,
                split_chunks=chunks,
            )
            log.info(f"Saved embeddings to {path}")
    if query.dim() == 3:  # whole images and their regions
        name = f"{name} + regions"
    elif regions:
        raise ValueError(
            f"region_scales={list(scales)} but {cfg.embeddings} holds whole-image features only: embed the "
            "benchmark again with the regions (leave out embeddings=), or set region_scales=[]."
        )
    if cfg.get("pca_dims") and cfg.get("embeddings") and query.shape[-1] > cfg.pca_dims:
        query, database = pca_reduce(query, database, cfg.pca_dims)
    if chunks > 1 and task != "partial_copy":
        raise ValueError(
            f"{name} gives token features for the split-product similarity, which only the partial-copy "
            "benchmarks score (benchmark=copy_segmix ...); use pool=token or avg for this benchmark."
        )
    if task == "copy_detection":
        thresholds = tuple(cfg.get("copy_thresholds") or ())
        metrics = copy_detection_metrics(
            query, database, query_labels, database_labels, thresholds, cfg.get("bootstrap", 1000), ks=cfg.ks
        )
        header, row = copy_table_row(name, metrics, thresholds)
    elif task == "partial_copy":
        ks = tuple(cfg.get("partial_copy_ks") or (1, 4, 10))
        metrics = partial_copy_metrics(
            query, database, query_labels, database_labels, ks, chunks, cfg.get("bootstrap", 1000)
        )
        header, row = partial_copy_row(name, metrics, ks)
    else:
        metrics = retrieval_metrics(query, database, query_labels, database_labels, ks=tuple(cfg.ks))
        header = "| Method | " + " | ".join([f"mAP@{k}" for k in cfg.ks] + [f"R@{k}" for k in cfg.ks]) + " |"
        row = table_row(name, metrics, tuple(cfg.ks))
    save_metrics(metrics, output_dir / "metrics.json")
    (output_dir / "table_row.md").write_text(header + "\n" + row + "\n")
    results = Path(cfg.paths.log_dir) / "evaluate" / "results.md"  # every evaluation adds its row here
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
        f.write(row + f"  <!-- {cfg.get('benchmark_name', '')} {output_dir.name} -->\n")
    print(header + "\n" + row)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate.yaml")
def main(cfg: DictConfig) -> float:
    metrics = evaluate(cfg)
    key = cfg.get("optimized_metric", "mAP@10")
    # a copy-detection set has no mAP@10: its headline is uAP; a partial-copy set's is mAP
    return metrics.get(key, metrics.get("uAP", metrics.get("mAP")))


if __name__ == "__main__":
    main()
