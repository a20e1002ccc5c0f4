"""Distances and filters of the extraction attack of Carlini et al. 2023, as pure functions on tensors.

Definitions (docs/attacks.md#extraction-definitions, docs/attacks.md#generate-and-filter):

- normalised l2 on pixels in [0, 1]: `l2(a, b) = sqrt(sum_i (a_i - b_i)^2 / d)`, d the number of values of one
  image (`normalized_l2`);
- tiled l2: both images cut into a grid of non-overlapping tiles (4 x 4 by default: 128 x 128 tiles at 512
  px), the distance the maximum over the tiles of the tiles' normalised l2 (`tiled_l2`);
- generate and filter: the generations of one prompt are the vertices of a graph with an edge where
  `d(i, j) <= edge_threshold`; the prompt is flagged when its largest clique has at least 10 members, and
  candidates are ranked by the mean distance inside the clique (`max_clique`, `clique_summary`; exact, by
  Bron-Kerbosch, up to a limit on the number of maximal cliques, which only dense graphs reach);
- verification: a generation is (l2, delta)-extracted when its nearest training image lies within
  delta = 0.15 (`nearest_training`);
- the CIFAR-10 adaptive score (docs/attacks.md#extraction-definitions): `l2(g, nearest) / (alpha * mean of
  l2(g, y) over the n nearest training images y, the nearest included)`, alpha = 0.5, n = 50, extracted below
  1 (`adaptive_extraction_score`).

Every pairwise distance comes from the expansion `||a||^2 + ||b||^2 - 2 a.b` as float32 matrix products, in
chunks so that memory stays bounded, on the device of the inputs. Its rounding error grows with the values per
image (per tile in `tiled_l2`) and is largest near distance 0. Measured on random images of d values: for two
copies of one image about 5e-4 at d = 3 x 64 x 64 and 4e-3 at d = 3 x 512 x 512; at l2 = 0.01, 5e-5 and 1e-3;
at l2 = 0.4, under 2e-5. The thresholds of the attack (0.05 to 0.15) are far above. The distances of a set to
itself (`b is a`) get an exact zero diagonal, as in scikit-learn's `euclidean_distances`. With TF32 matrix
products enabled on CUDA (`torch.backends.cuda.matmul.allow_tf32`) the error is far larger.
"""

import math

import networkx as nx
import numpy as np
import torch

# Maximal cliques `max_clique` enumerates before it gives up (about a second of networkx.find_cliques).
MAX_MAXIMAL_CLIQUES = 100_000
CHUNK = 256  # rows of `a` (generations) per matrix product
TRAIN_CHUNK = 65_536  # training images per matrix product of the nearest-neighbour searches
# Float32 values of one block of `tiled_l2`: tiles x rows x B products, or rows x d pixels (128 MiB).
BLOCK_VALUES = 2**25


# ---- checks ----------------------------------------------------------------------------------------------
def check_pixels(x, name: str) -> torch.Tensor:
    """`x` as a floating-point tensor of >= 2 dims (images first); TypeError or ValueError naming `name`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must hold floating-point pixels in [0, 1], got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be (N, ...) images, got shape {tuple(x.shape)}")
    return x


def flat_pixels(a, b, names=("a", "b")) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (A, d) and (B, d) of two image sets of equal size d per image."""
    a, b = check_pixels(a, names[0]), check_pixels(b, names[1])
    if a.shape[1:].numel() != b.shape[1:].numel():
        raise ValueError(
            f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} differ in values per image"
        )
    return a.reshape(len(a), a.shape[1:].numel()), b.reshape(len(b), b.shape[1:].numel())


def check_tiled(a, b, grid) -> tuple[int, int]:
    """The grid (rows, columns) after checking (N, C, H, W) images of equal C, H, W that it divides."""
    a, b = check_pixels(a, "a"), check_pixels(b, "b")
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"tiled_l2 needs (N, C, H, W) images, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} differ in (C, H, W)")
    rows, columns = grid
    height, width = a.shape[2:]
    if rows < 1 or columns < 1 or height % rows or width % columns:
        raise ValueError(
            f"images of {height} x {width} pixels do not split into a {rows} x {columns} grid of equal tiles: "
            f"H must be a multiple of {rows} and W of {columns}"
        )
    return rows, columns


def as_distance_matrix(distances) -> np.ndarray:
    """A square (N, N) distance matrix (tensor or array) as float64 numpy on the CPU."""
    if isinstance(distances, torch.Tensor):
        distances = distances.detach().cpu().double().numpy()
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
        raise ValueError(f"distances must be a square (N, N) matrix, got shape {distances.shape}")
    return distances


# ---- pairwise distances ----------------------------------------------------------------------------------
def squared_norms(rows: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """(N,) float32 squared norms of the rows of (N, d), chunk by chunk (no N x d temporary)."""
    norms = torch.empty(len(rows), device=rows.device)
    for start in range(0, len(rows), chunk):
        block = rows[start : start + chunk].float()
        norms[start : start + chunk] = (block * block).sum(1)
    return norms


def squared_distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) squared l2 between float32 rows, `||a||^2 + ||b||^2 - 2 a.b`, clamped at 0."""
    a_sq = (a * a).sum(1, keepdim=True)
    return (a @ b.T).mul_(-2).add_(a_sq).add_(b_sq).clamp_min_(0)


def normalized_l2(a, b, chunk: int = CHUNK) -> torch.Tensor:
    """(A, B) normalised l2, `sqrt(sum (a - b)^2 / d)`, between images a (A, ...) and b (B, ...) in [0, 1].

    Float32 matrix products over `chunk` rows of a at a time (docs/attacks.md#extraction-definitions).
    """
    flat_a, flat_b = flat_pixels(a, b)
    b_rows = flat_b.float()
    b_sq = squared_norms(b_rows, chunk)
    out = torch.empty(len(flat_a), len(flat_b), device=b_rows.device)
    for start in range(0, len(flat_a), chunk):
        out[start : start + chunk] = squared_distances(flat_a[start : start + chunk].float(), b_rows, b_sq)
    out = out.div_(max(flat_a.shape[1], 1)).sqrt_()
    if a is b:
        out.fill_diagonal_(0)
    return out


def image_tiles(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(T, N, C * h * w) float32 tiles of (N, C, H, W) images, tile j of every image in row j."""
    n, channels, height, width = images.shape
    rows, columns = grid
    tiles = images.reshape(n, channels, rows, height // rows, columns, width // columns)
    tile_dim = channels * (height // rows) * (width // columns)
    return tiles.permute(2, 4, 0, 1, 3, 5).reshape(rows * columns, n, tile_dim).float()


def tiles_and_norms(images: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N, t) float32 tiles of (N, C, H, W) images and their (T, N) squared norms."""
    tiles = image_tiles(images, grid)
    return tiles, squared_norms(tiles.reshape(-1, tiles.shape[2])).reshape(tiles.shape[:2])


def tiled_rows(b: torch.Tensor, grid: tuple[int, int]) -> int:
    """Images of `a` per block of `tiled_l2`: (T, rows, B) products and (rows, d) pixels within BLOCK_VALUES."""
    tiles = grid[0] * grid[1]
    return max(1, min(BLOCK_VALUES // max(tiles * len(b), 1), BLOCK_VALUES // max(b.shape[1:].numel(), 1)))


def tiled_l2(a, b, grid: tuple[int, int] = (4, 4), chunk: int | None = None) -> torch.Tensor:
    """(A, B) tiled l2 between images a (A, C, H, W) and b (B, C, H, W) in [0, 1]: the maximum over the tiles
    of a `grid` (rows, columns) of the tiles' normalised l2 (docs/attacks.md#generate-and-filter).

    Per block of `chunk` images of a (default: as many as keep a block within BLOCK_VALUES floats), one batched
    matrix product over the tile axis. ValueError when the shapes differ or the grid does not divide H, W.
    """
    grid = check_tiled(a, b, grid)
    chunk = chunk or tiled_rows(b, grid)
    b_tiles, b_sq = tiles_and_norms(b, grid)  # (T, B, t), (T, B)
    out = torch.empty(len(a), len(b), device=b_tiles.device)
    for start in range(0, len(a), chunk):
        stop = start + chunk
        if a is b:  # a set against itself: its tiles are already cut
            a_tiles, a_sq = b_tiles[:, start:stop], b_sq[:, start:stop]
        else:
            a_tiles, a_sq = tiles_and_norms(a[start:stop], grid)
        products = torch.bmm(a_tiles, b_tiles.transpose(1, 2))  # (T, c, B)
        out[start:stop] = products.mul_(-2).add_(a_sq[:, :, None]).add_(b_sq[:, None, :]).amax(0)
    out = out.clamp_min_(0).div_(max(b_tiles.shape[2], 1)).sqrt_()
    if a is b:
        out.fill_diagonal_(0)
    return out


# ---- nearest training images -----------------------------------------------------------------------------
def nearest_k(generated, train, k: int, chunk: int, train_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(l2 (G, k) ascending, index (G, k)) of each generation's k nearest training images by normalised l2,
    with a running top k over blocks of `train_chunk` training images."""
    flat_g, flat_t = flat_pixels(generated, train, ("generated", "train"))
    if len(flat_t) == 0:
        raise ValueError(f"train is empty (shape {tuple(train.shape)})")
    t_sq = squared_norms(flat_t, chunk)
    distances = torch.empty(len(flat_g), k, device=t_sq.device)
    indices = torch.empty(len(flat_g), k, dtype=torch.long, device=t_sq.device)
    for g0 in range(0, len(flat_g), chunk):
        rows = flat_g[g0 : g0 + chunk].float()
        kept_sq = kept_index = None
        for t0 in range(0, len(flat_t), train_chunk):
            block_sq = squared_distances(
                rows, flat_t[t0 : t0 + train_chunk].float(), t_sq[t0 : t0 + train_chunk]
            )
            block_index = torch.arange(t0, t0 + block_sq.shape[1], device=rows.device).expand_as(block_sq)
            if kept_sq is not None:
                block_sq, block_index = (
                    torch.cat([kept_sq, block_sq], 1),
                    torch.cat([kept_index, block_index], 1),
                )
            kept_sq, position = block_sq.topk(min(k, block_sq.shape[1]), dim=1, largest=False)
            kept_index = block_index.gather(1, position)
        distances[g0 : g0 + chunk], indices[g0 : g0 + chunk] = kept_sq, kept_index
    return distances.div_(max(flat_t.shape[1], 1)).sqrt_(), indices


def nearest_training(
    generated, train, chunk: int = CHUNK, train_chunk: int = TRAIN_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(l2 (G,), index (G,)): each generation's exact nearest training image by normalised l2, the
    verification step (extracted when l2 <= delta = 0.15; docs/attacks.md#generate-and-filter)."""
    distances, indices = nearest_k(generated, train, 1, chunk, train_chunk)
    return distances[:, 0], indices[:, 0]


def adaptive_extraction_score(
    generated, train, alpha: float = 0.5, n: int = 50, chunk: int = CHUNK, train_chunk: int = TRAIN_CHUNK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores (G,), nearest (G,), nearest_l2 (G,)): the CIFAR-10 adaptive score
    `l2(g, nearest) / (alpha * mean l2(g, y) over the n nearest y)`, n clipped to the training set size;
    extracted when below 1 (docs/attacks.md#extraction-definitions). A generation whose n nearest training
    images all lie at distance 0 scores 0 (an exact copy)."""
    if alpha <= 0 or n < 1:
        raise ValueError(f"alpha must be > 0 and n >= 1, got alpha={alpha}, n={n}")
    distances, indices = nearest_k(generated, train, min(n, len(train)), chunk, train_chunk)
    nearest_l2, mean = distances[:, 0], distances.mean(1)
    scores = torch.where(mean > 0, nearest_l2 / (alpha * mean), torch.zeros_like(mean))
    return scores, indices[:, 0], nearest_l2


# ---- cliques ---------------------------------------------------------------------------------------------
def proximity_graph(distances: np.ndarray, edge_threshold: float) -> nx.Graph:
    """Graph on range(N) with an edge i < j where distances[i, j] <= edge_threshold (upper triangle read)."""
    graph = nx.Graph()
    graph.add_nodes_from(range(len(distances)))
    graph.add_edges_from(zip(*np.nonzero(np.triu(distances <= edge_threshold, k=1)), strict=True))
    return graph


def mean_pairwise(distances: np.ndarray, members: list[int]) -> float:
    """Mean of distances[i, j] over the pairs i < j of `members` (sorted); nan for fewer than 2."""
    if len(members) < 2:
        return math.nan
    inside = distances[np.ix_(members, members)]
    return float(inside[np.triu_indices(len(members), k=1)].mean())


def largest_clique(distances: np.ndarray, edge_threshold: float, limit: int) -> tuple[list[int], bool]:
    """(sorted members, exact): a maximum clique, among the maximum ones the smallest mean distance, then the
    lowest indices; Bron-Kerbosch (networkx.find_cliques) over the maximal cliques, fast on sparse graphs.
    After `limit` maximal cliques the search stops: (the largest found so far, False)."""
    best, best_key = [], None
    for count, clique in enumerate(nx.find_cliques(proximity_graph(distances, edge_threshold)), 1):
        if count > limit:
            return best, False
        if len(clique) < len(best):
            continue
        members = sorted(int(i) for i in clique)
        mean = mean_pairwise(distances, members)
        key = (-len(members), 0.0 if math.isnan(mean) else mean, members)
        if best_key is None or key < best_key:
            best, best_key = members, key
    return best, True


def max_clique(distances, edge_threshold: float, limit: int = MAX_MAXIMAL_CLIQUES) -> list[int]:
    """Sorted members of a maximum clique of the graph with an edge i != j where distances[i, j] <=
    edge_threshold (the upper triangle is read; docs/attacks.md#generate-and-filter). Ties: the smallest mean
    intra-clique distance, then the lowest indices. An isolated vertex is a clique of size 1.

    RuntimeError after `limit` maximal cliques: a threshold inside the narrow band of distances of a cluster
    of near-copies makes a dense random-like graph, where the exact search is exponential."""
    matrix = as_distance_matrix(distances)
    members, exact = largest_clique(matrix, edge_threshold, limit)
    if not exact:
        edges = int(np.triu(matrix <= edge_threshold, k=1).sum())
        raise RuntimeError(
            f"more than {limit} maximal cliques at edge_threshold {edge_threshold} ({edges} edges among "
            f"{len(matrix)} vertices): the exact maximum clique search is exponential on such dense graphs; "
            f"raise limit, or take clique_summary's largest clique found so far (exact False)"
        )
    return members


def clique_summary(
    distances, edge_thresholds: list[float], min_clique_size: int = 10, limit: int = MAX_MAXIMAL_CLIQUES
) -> list[dict]:
    """One row per edge threshold: {"edge_threshold", "clique" (sorted indices), "clique_size",
    "mean_distance" (mean pairwise distance inside the clique, nan below 2 members), "flagged" (size >=
    min_clique_size), "exact"} (docs/attacks.md#generate-and-filter).

    "exact" is False where the search stopped after `limit` maximal cliques (see `max_clique`): the clique is
    then the largest found so far, a lower bound, so "flagged" True is still certain but False is not."""
    if min_clique_size < 1:
        raise ValueError(f"min_clique_size must be >= 1, got {min_clique_size}")
    matrix = as_distance_matrix(distances)
    rows = []
    for threshold in edge_thresholds:
        clique, exact = largest_clique(matrix, threshold, limit)
        rows.append(
            {
                "edge_threshold": float(threshold),
                "clique": clique,
                "clique_size": len(clique),
                "mean_distance": mean_pairwise(matrix, clique),
                "flagged": len(clique) >= min_clique_size,
                "exact": exact,
            }
        )
    return rows
