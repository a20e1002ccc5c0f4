"""Replication analysis: exact bounded-memory similarity search of generations against training images.

Statistics over the search results live in `src.metrics.replication` (pure functions on features).
"""

from src.replication.analysis import analyse_replication
from src.replication.search import faiss_topk, search_topk, split_product_similarity

__all__ = ["analyse_replication", "faiss_topk", "search_topk", "split_product_similarity"]
