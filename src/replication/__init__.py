"""Replication analysis: exact bounded-memory similarity search of generations against training images.

Statistics over the search results live in `src.metrics.replication` (pure functions on features); the whole
report is `src.replication.analysis.analyse_replication`.
"""

from src.replication.search import faiss_topk, search_topk, split_product_similarity

__all__ = ["faiss_topk", "search_topk", "split_product_similarity"]
