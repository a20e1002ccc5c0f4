"""The exact top-k search lives in `src.metrics.search`; this path keeps `from src.replication.search import
search_topk` working."""

from src.metrics.search import search_topk

__all__ = ["search_topk"]
