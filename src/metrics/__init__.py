"""Metrics as pure functions on tensors, importing nothing else from `src`: the exact top-k search, retrieval
metrics for style and copy retrieval, replication statistics, the Fréchet distance and the CLIP score from
features."""

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
    "count_relevant",
    "hit_matrix",
    "metrics_from_hits",
    "per_label_precision",
    "replication_stats",
    "retrieval_metrics",
    "retrieval_topk",
    "search_topk",
]
