"""Copy-detection scores of a descriptor: queries searched against a database in which some queries have their
source and others have nothing (docs/replication.md#scoring-a-copy-detector).

Each query predicts one database image, its nearest neighbour, with the cosine as confidence. A prediction is
correct when that image is one the query copies (they share a label). As in the DISC / SSCD evaluation, the
predictions of all queries are ranked by confidence together, so one threshold serves every query:

- `uAP`: micro average precision of that global ranking (recall is over the queries that have a copy in the
  database; a query without one can only add false positives). One prediction per query, where DISC keeps up
  to ten.
- `recall@p90` and `threshold@p90`: the largest recall whose precision is at least 0.9, and the lowest cosine
  that still keeps precision at 0.9 (the operating point SSCD's evaluation reports).
- `precision@t`, `recall@t` for each threshold t given: the copies a study would count at that threshold.
- `mAP@k`: the standard average precision of each query's copies in its top k, averaged over the queries with
  copies, and `recall@topk`, the share of them with a copy in their top k (the retrieval view: are the copies
  at the top of each query's list, whatever the scores).

`bootstrap` resamples the queries (with replacement) and gives 95% percentile intervals of every figure.
Features (rows, 1 + R, D) of each image and its regions are searched by region matching (`region_topk`,
docs/replication.md#region-matching).
"""

import numpy as np
import torch
from scipy.stats import rankdata

from src.metrics.retrieval import count_relevant, hit_matrix, metrics_from_hits, retrieval_topk
from src.metrics.search import as_features, as_region_features, region_scores, region_topk

P90 = 0.9


def micro_ap(scores: np.ndarray, correct: np.ndarray, num_with_copy: int) -> float:
    """Average precision of predictions ranked by score (descending), recall over `num_with_copy` queries."""
    if num_with_copy == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = correct[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / num_with_copy)


def recall_at_precision(
    scores: np.ndarray, correct: np.ndarray, num_with_copy: int, target: float = P90
) -> tuple[float, float]:
    """(largest recall at precision >= target, the threshold that gives it) over thresholds at the scores.

    Thresholds sit at the scores themselves (a prediction counts when its score >= threshold); tied scores
    enter together. (0, inf) when no threshold reaches the target precision.
    """
    if num_with_copy == 0 or len(scores) == 0:
        return 0.0, float("inf")
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], correct[order].astype(np.float64)
    cum_hits = np.cumsum(hits)
    # the last position of each run of tied scores: a threshold keeps all of a tie or none of it
    last = np.r_[ranked[1:] != ranked[:-1], True]
    counts = np.arange(1, len(ranked) + 1)[last]
    precision, recall = cum_hits[last] / counts, cum_hits[last] / num_with_copy
    ok = precision >= target
    if not ok.any():
        return 0.0, float("inf")
    best = int(np.flatnonzero(ok)[np.argmax(recall[ok])])
    return float(recall[best]), float(ranked[last][best])


def _point(scores, correct, has_copy, thresholds) -> dict[str, float]:
    num_with_copy = int(has_copy.sum())
    out = {"uAP": micro_ap(scores, correct, num_with_copy)}
    out["recall@p90"], out["threshold@p90"] = recall_at_precision(scores, correct, num_with_copy)
    for t in thresholds:
        flagged = scores >= t
        out[f"precision@{t:g}"] = float(correct[flagged].mean()) if flagged.any() else float("nan")
        out[f"recall@{t:g}"] = float((correct & flagged).sum() / max(num_with_copy, 1))
        out[f"flagged@{t:g}"] = float(flagged.mean())
    return out


def copy_detection_metrics(
    query,
    database,
    query_labels,
    database_labels,
    thresholds=(0.5, 0.75, 0.9),
    bootstrap: int = 1000,
    seed: int = 0,
    ks=(1, 10, 100),
) -> dict[str, float]:
    """Copy-detection figures of L2-normalised descriptors (see the module docstring).

    query (Q, D), database (N, D), or (Q, 1 + R, D) / (N, 1 + R, D) with regions; query_labels (Q, L) /
    database_labels (N, L) multi-hot bool: a query copies the database images it shares a label with; an all-False
    query row is a query with no copy in the database.
    Returns the point figures, `mAP@k` for each k (queries with copies), counts, and with bootstrap > 0
    `<name>_lo` / `<name>_hi` (95% percentile intervals over resampled queries).
    """
    # One search serves both views: the top-1 prediction of each query and its ranked list for mAP@k.
    top_scores, hits, n_copies = _search_hits(query, database, query_labels, database_labels, max(ks))
    with_copy = n_copies > 0
    if not with_copy.any():
        raise ValueError("copy_detection_metrics: no query has a copy in the database; nothing to detect.")
    scores, correct, has_copy = top_scores[:, 0].double().cpu().numpy(), hits[:, 0].numpy(), with_copy.numpy()
    thresholds = tuple(float(t) for t in thresholds)
    point = _point(scores, correct, has_copy, thresholds)
    out = dict(point)
    ranked = metrics_from_hits(hits[with_copy], n_copies[with_copy], ks)
    for k in ks:  # standard AP (the copies' precision at their ranks over min(k, copies)), not CSD's mAP@k
        out[f"mAP@{k}"], out[f"recall@top{k}"] = ranked[f"standardAP@{k}"], ranked[f"recall@{k}"]
    out.update(
        num_queries=float(len(scores)),
        num_with_copy=float(has_copy.sum()),
        num_database=float(len(database_labels)),
    )
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(bootstrap):
            pick = rng.integers(0, len(scores), len(scores))
            if has_copy[pick].any():
                draws.append(_point(scores[pick], correct[pick], has_copy[pick], thresholds))
        for key in point:
            values = np.array([d[key] for d in draws], dtype=np.float64)
            values = values[np.isfinite(values)]
            lo, hi = np.percentile(values, [2.5, 97.5]) if len(values) else (np.nan, np.nan)
            out[f"{key}_lo"], out[f"{key}_hi"] = float(lo), float(hi)
    return out


def _features(query, database) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked features: (rows, D) each, or (rows, 1 + R, D) each (whole images and their regions, the same R)."""
    query, database = torch.as_tensor(query), torch.as_tensor(database)
    if query.dim() == 3 or database.dim() == 3:
        return as_region_features(query, database)
    return as_features(query, "query"), as_features(database, "database")


def _search_hits(query, database, query_labels, database_labels, k: int):
    """Checked features and labels searched for copies: (top-k scores (Q, k'), whether each is a copy (Q, k') bool,
    copies of each query in the database (Q,)). Exact inner products (`retrieval_topk`), or region matching
    (`region_topk`) for features (rows, 1 + R, D)."""
    query, database = _features(query, database)
    query_labels = torch.as_tensor(query_labels, dtype=torch.bool)
    database_labels = torch.as_tensor(database_labels, dtype=torch.bool)
    if query_labels.shape[0] != len(query) or database_labels.shape[0] != len(database):
        raise ValueError(
            f"copy detection: {len(query)} queries / {len(database)} database rows but labels of "
            f"{query_labels.shape[0]} / {database_labels.shape[0]} rows."
        )
    if query.dim() == 3:
        scores, indices = region_topk(query, database, k, backend="torch")
    else:
        scores, indices = retrieval_topk(query, database, k)
    hits = hit_matrix(query_labels, database_labels, indices).cpu()
    return scores, hits, count_relevant(query_labels, database_labels).cpu()


def top1_predictions(
    query, database, query_labels, database_labels
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's prediction as `copy_detection_metrics` scores it: (top-1 score (Q,) float64, whether that
    image is a copy of the query (Q,) bool, whether the query has a copy in the database (Q,) bool). Features
    (rows, 1 + R, D) are searched by region matching."""
    scores, hits, n_copies = _search_hits(query, database, query_labels, database_labels, 1)
    return scores[:, 0].double().cpu().numpy(), hits[:, 0].numpy(), (n_copies > 0).numpy()


def uap_difference(first, second, has_copy, bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """uAP of one descriptor minus another's on the same queries, with a paired 95% bootstrap interval.

    first, second: (scores, correct) per query (`top1_predictions`); has_copy (Q,) bool. The queries are
    resampled once per draw for both descriptors, so the interval is that of the difference itself (narrower than
    the two descriptors' own intervals side by side when their errors fall on the same queries). Returns
    `difference`, `difference_lo`, `difference_hi` and `share_above_zero` (of the draws).
    """
    has_copy = np.asarray(has_copy, dtype=bool)
    (s1, c1), (s2, c2) = ((np.asarray(s, np.float64), np.asarray(c, bool)) for s, c in (first, second))
    if not (len(s1) == len(s2) == len(has_copy)):
        raise ValueError(f"uap_difference: {len(s1)} and {len(s2)} predictions for {len(has_copy)} queries.")
    out = {"difference": micro_ap(s1, c1, int(has_copy.sum())) - micro_ap(s2, c2, int(has_copy.sum()))}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(has_copy), len(has_copy))
        n = int(has_copy[pick].sum())
        if n:
            draws.append(micro_ap(s1[pick], c1[pick], n) - micro_ap(s2[pick], c2[pick], n))
    if draws:
        out["difference_lo"], out["difference_hi"] = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
        out["share_above_zero"] = float(np.mean(np.array(draws) > 0))
    return out


def split_product_scores(query: torch.Tensor, database: torch.Tensor, chunks: int) -> torch.Tensor:
    """(Q, N) split-product similarities (docs/replication.md#split-product-similarity): each row of `query`
    (Q, chunks * D) and `database` (N, chunks * D) is cut into `chunks` pieces of D values, and the score is the
    largest of the per-position inner products, max_t <q_t, v_t>. Rows are expected L2-normalised as a whole.
    """
    if query.shape[1] != database.shape[1]:
        raise ValueError(
            f"split_product_scores: query rows have {query.shape[1]} values and database rows {database.shape[1]}."
        )
    if chunks < 1 or query.shape[1] % chunks:
        raise ValueError(f"split_product_scores: {query.shape[1]} values cannot be cut into {chunks} chunks.")
    q = query.reshape(len(query), chunks, -1)
    d = database.reshape(len(database), chunks, -1)
    return torch.einsum("qtd,ntd->qnt", q, d).amax(dim=2)


def positive_ranks(
    query, database, query_labels, database_labels, chunks: int = 1, chunk_size: int = 64
) -> list[np.ndarray]:
    """For each query, the sorted 0-based positions of its positives (database rows sharing a label) in its full
    ranking of the database by similarity (descending; ties by database order, as a stable sort). Inner products,
    or split-product similarities when `chunks` > 1, or region matching (`region_scores`) for features
    (rows, 1 + R, D)."""
    query, database = _features(query, database)
    query_labels = torch.as_tensor(query_labels, dtype=torch.bool)
    database_labels = torch.as_tensor(database_labels, dtype=torch.bool)
    if query.shape[-1] != database.shape[-1]:
        raise ValueError(
            f"query embeddings have {query.shape[-1]} dimensions and database embeddings {database.shape[-1]}: "
            "both sets must come from the same extractor."
        )
    if query_labels.shape[0] != len(query) or database_labels.shape[0] != len(database):
        raise ValueError(
            f"{len(query)} queries / {len(database)} database rows but labels of {query_labels.shape[0]} / "
            f"{database_labels.shape[0]} rows."
        )
    positives = (query_labels.float() @ database_labels.float().T) > 0  # (Q, N)
    out = []
    for start in range(0, len(query), chunk_size):
        q = query[start : start + chunk_size]
        if query.dim() == 3:
            scores = region_scores(q, database)
        else:
            scores = split_product_scores(q, database, chunks) if chunks > 1 else q @ database.T
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        ranked_positive = positives[start : start + chunk_size].gather(1, order)  # (c, N) in rank order
        out.extend(np.flatnonzero(row) for row in ranked_positive.numpy())
    return out


def trapezoid_ap(ranks: np.ndarray, num_positives: int) -> float:
    """Average precision of positives at sorted 0-based `ranks`, the trapezoids of the precision-recall curve
    (the revisited-Oxford `compute_ap` the Forgery paper's retrieval code uses): at the j-th positive (0-based)
    found at rank r, recall rises by 1 / num_positives and precision goes from j / r (1 at r = 0) to
    (j + 1) / (r + 1); the step adds the mean of the two."""
    j = np.arange(len(ranks), dtype=np.float64)
    r = ranks.astype(np.float64)
    before = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    after = (j + 1) / (r + 1)
    return float(((before + after) / 2).sum() / num_positives)


def _ranked_point(per_query: dict[str, np.ndarray], pick: np.ndarray) -> dict[str, float]:
    return {key: float(values[pick].mean()) for key, values in per_query.items()}


def partial_copy_metrics(
    query,
    database,
    query_labels,
    database_labels,
    ks=(1, 4, 10),
    chunks: int = 1,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Retrieval of each source's copies, scored as the Forgery paper's benchmark code scores it
    (docs/replication.md#the-partial-copy-benchmark): over the queries with at least one copy in the database,
    `mAP` (trapezoidal AP over the full ranking), `precision@k` (the revisited-Oxford variant: precision at
    min(k, rank of the last copy), so a query whose 4 copies are ranked first scores 1 at k = 10), `recall@k`
    and `MRR` (1 / rank of the first copy). `chunks` > 1 scores with the split-product similarity; features
    (rows, 1 + R, D) by region matching.
    With bootstrap > 0, `<name>_lo` / `<name>_hi`: 95% percentile intervals over resampled queries.
    """
    query_labels = torch.as_tensor(query_labels, dtype=torch.bool)
    database_labels = torch.as_tensor(database_labels, dtype=torch.bool)
    ranks = positive_ranks(query, database, query_labels, database_labels, chunks)
    kept = [i for i, r in enumerate(ranks) if len(r)]
    if not kept:
        raise ValueError("partial_copy_metrics: no query has a copy in the database; nothing to retrieve.")
    per_query = {"mAP": [], "MRR": []}
    for k in ks:
        per_query[f"precision@{k}"], per_query[f"recall@{k}"] = [], []
    for i in kept:
        r = ranks[i]
        per_query["mAP"].append(trapezoid_ap(r, len(r)))
        per_query["MRR"].append(1.0 / (r[0] + 1))
        one_based = r + 1
        for k in ks:
            kq = min(int(one_based[-1]), k)
            per_query[f"precision@{k}"].append((one_based <= kq).sum() / kq)
            per_query[f"recall@{k}"].append((one_based <= k).sum() / len(r))
    per_query = {key: np.asarray(values, dtype=np.float64) for key, values in per_query.items()}
    everyone = np.arange(len(kept))
    out = _ranked_point(per_query, everyone)
    out.update(
        num_queries=float(len(ranks)), num_with_copy=float(len(kept)), num_database=float(len(database))
    )
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = [_ranked_point(per_query, rng.integers(0, len(kept), len(kept))) for _ in range(bootstrap)]
        for key in per_query:
            lo, hi = np.percentile([d[key] for d in draws], [2.5, 97.5])
            out[f"{key}_lo"], out[f"{key}_hi"] = float(lo), float(hi)
    return out


def average_rank(table: dict[str, dict[str, float]], higher_is_better: bool = True) -> dict[str, float]:
    """The Forgery paper's "average rank" (lower is better): for each setting (a column of `table`, e.g. one
    metric on one set), the methods (rows) are ranked 1, 2, ... by their value, tied values sharing the mean of
    their ranks; a method's figure is its mean rank over the settings. table: {method: {setting: value}}; every
    method must have every setting."""
    methods = list(table)
    if not methods:
        raise ValueError("average_rank: the table has no methods.")
    settings = list(table[methods[0]])
    for method in methods:
        if set(table[method]) != set(settings):
            missing = sorted(set(settings) ^ set(table[method]))
            raise ValueError(
                f"average_rank: {method!r} lacks or adds settings {missing}; rank like with like."
            )
    ranks = np.zeros(len(methods))
    for setting in settings:
        values = np.array([table[m][setting] for m in methods], dtype=np.float64)
        ranks += rankdata(-values if higher_is_better else values, method="average")
    return {m: float(r / len(settings)) for m, r in zip(methods, ranks, strict=True)}
