"""Metrics as pure functions on tensors (no Lightning): retrieval metrics for style and copy retrieval."""

from src.metrics.retrieval import (
    count_relevant,
    hit_matrix,
    metrics_from_hits,
    per_label_precision,
    retrieval_metrics,
    retrieval_topk,
)

__all__ = [
    "count_relevant",
    "hit_matrix",
    "metrics_from_hits",
    "per_label_precision",
    "retrieval_metrics",
    "retrieval_topk",
]
from src.metrics.replication import replication_stats  # noqa: E402, F401
