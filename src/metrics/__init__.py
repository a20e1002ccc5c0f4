"""Metrics as pure functions on tensors, importing nothing else from `src`: the exact top-k search, retrieval
metrics for style and copy retrieval, copy-detection scores, replication statistics, the Fréchet distance, the
CLIP score from features, extraction distances (tiled l2, cliques, the adaptive score) and membership ROC
summaries."""

from src.metrics.copy_detection import (
    average_rank,
    copy_detection_metrics,
    partial_copy_metrics,
    top1_predictions,
    uap_difference,
)
from src.metrics.extraction import (
    adaptive_extraction_score,
    clique_summary,
    max_clique,
    nearest_training,
    tiled_l2,
)
from src.metrics.membership import roc_curve, roc_summary
from src.metrics.replication import replication_stats
from src.metrics.retrieval import (
    count_relevant,
    hit_matrix,
    metrics_from_hits,
    per_label_precision,
    retrieval_metrics,
    retrieval_topk,
)
from src.metrics.search import search_topk

__all__ = [
    "adaptive_extraction_score",
    "average_rank",
    "clique_summary",
    "copy_detection_metrics",
    "top1_predictions",
    "uap_difference",
    "count_relevant",
    "hit_matrix",
    "max_clique",
    "metrics_from_hits",
    "partial_copy_metrics",
    "nearest_training",
    "per_label_precision",
    "replication_stats",
    "retrieval_metrics",
    "retrieval_topk",
    "roc_curve",
    "roc_summary",
    "search_topk",
    "tiled_l2",
]
