"""Style retrieval benchmarks: a query set searched against a database set
(docs/style.md#evaluation-protocol).

A hit is a database image sharing a label with the query (artist for WikiArt, domain for DomainNet, any
of several labels for multi-label CSVs). Labels are stored multi-hot, so single- and multi-label
benchmarks go through the same metric code (`src.metrics`).

Formats:
- generic CSV (`load_retrieval_csv`, also what the style bench writes): header `path,label,split`; `label`
  may hold several labels separated by `|`; `split` is `query` or `database`.
- WikiArt (`load_wikiart`): the official `wikiart.csv` (not public); the official loader reads the columns
  `name` (file name), `path`, `artist` and `split` (CSD `data/wikiart.py`).
- DomainNet (`load_domainnet`): a `path,split` file; see the function.
Relative image paths are relative to the benchmark root; absolute ones are used as they are.
"""

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPLITS = ("query", "database")


@dataclass
class RetrievalSet:
    """Query and database image paths with multi-hot labels over `label_names`.

    query_labels: (Q, L) bool; database_labels: (N, L) bool. Every query has at least one label that
    occurs in the full database (queries without one are dropped on loading and counted in
    `num_dropped_queries`), except in a copy-detection set (`task="copy_detection"`, e.g.
    `src.data.planted_copies`), where a query without a label is one with no copy in the database and a database
    image without one is a distractor.
    """

    root: Path
    query: list[str]
    database: list[str]
    query_labels: torch.Tensor
    database_labels: torch.Tensor
    label_names: list[str]
    num_dropped_queries: int = 0
    task: str = "retrieval"  # retrieval | copy_detection

    @property
    def num_queries(self) -> int:
        return len(self.query)

    @property
    def num_database(self) -> int:
        return len(self.database)

    def subsample(self, max_queries, max_database, seed: int, replace: bool = False) -> "RetrievalSet":
        """A random subset of at most max_queries queries and max_database database images (None = all).

        The official in-training evaluation (docs/style.md#training-hyper-parameters) draws exactly
        maxsize=512 queries and 8x512 database images *with replacement* (`np.random.randint`); replace=True
        reproduces that. The default draws without replacement, because repeated database images fill the
        top-k with copies of one image and inflate mAP@k / Recall@k. Without replacement the chosen images
        keep their file order. The same seed gives the same subset. The subset's queries may lose all their
        positives in the smaller database; they then score 0, as in the official code.
        """
        generator = torch.Generator().manual_seed(seed)
        query_index = _draw(len(self.query), max_queries, replace, generator)
        database_index = _draw(len(self.database), max_database, replace, generator)
        return RetrievalSet(
            root=self.root,
            query=[self.query[i] for i in query_index.tolist()],
            database=[self.database[i] for i in database_index.tolist()],
            query_labels=self.query_labels[query_index],
            database_labels=self.database_labels[database_index],
            label_names=self.label_names,
            num_dropped_queries=self.num_dropped_queries,
            task=self.task,
        )


def _draw(n: int, k, replace: bool, generator: torch.Generator) -> torch.Tensor:
    if k is None or (k >= n and not replace):
        return torch.arange(n)
    if k <= 0:
        raise ValueError(f"subsample size must be positive or None, got {k}")
    if replace:
        return torch.randint(n, (k,), generator=generator)
    return torch.randperm(n, generator=generator)[:k].sort().values


def build_retrieval_set(root, rows, source: str) -> RetrievalSet:
    """Build a RetrievalSet from rows (path, [label, ...], split).

    Only labels present in the database count; query labels absent from it are removed, and queries left
    with no label are dropped, counted and logged (the official WikiArt loader keeps only artists that
    occur in the database). `source` names the file in messages.
    """
    database_label_names = sorted(
        {label for _, labels, split in rows if split == "database" for label in labels}
    )
    if not any(split == "database" for _, _, split in rows):
        raise ValueError(f"{source}: no row has split 'database'")
    column = {name: i for i, name in enumerate(database_label_names)}
    paths = {"query": [], "database": []}
    labels = {"query": [], "database": []}
    num_dropped = 0
    for path, row_labels, split in rows:
        known = [column[label] for label in row_labels if label in column]
        if not known:
            # A database row always has a known label unless its label field was empty.
            if split == "database":
                raise ValueError(f"{source}: database image '{path}' has no label")
            num_dropped += 1
            continue
        multi_hot = torch.zeros(len(column), dtype=torch.bool)
        multi_hot[known] = True
        paths[split].append(path)
        labels[split].append(multi_hot)
    if num_dropped:
        log.warning("%s: dropped %d queries whose labels do not occur in the database", source, num_dropped)
    if not paths["query"]:
        raise ValueError(f"{source}: no query image has a label that occurs in the database")
    return RetrievalSet(
        root=Path(root),
        query=paths["query"],
        database=paths["database"],
        query_labels=torch.stack(labels["query"]),
        database_labels=torch.stack(labels["database"]),
        label_names=database_label_names,
        num_dropped_queries=num_dropped,
    )


def _read_csv_rows(csv_path: Path, required: dict[str, tuple[str, ...]]):
    """Yield (line number, {role: value}) from a CSV; `required` maps a role to accepted column names."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        columns = {}
        for role, names in required.items():
            found = [name for name in names if name in fields]
            if not found:
                raise ValueError(
                    f"'{csv_path}', line 1: expected a column {' or '.join(repr(n) for n in names)} in the "
                    f"header, found {fields}"
                )
            columns[role] = found[0]
        for row in reader:
            yield reader.line_num, {role: (row[column] or "").strip() for role, column in columns.items()}


def _check_split(csv_path: Path, line_num: int, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"'{csv_path}', line {line_num}: split '{split}' is not one of {SPLITS}")
    return split


def load_retrieval_csv(csv_path, root=None) -> RetrievalSet:
    """Read a `path,label,split` CSV (labels separated by `|`); root defaults to the CSV's folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"retrieval CSV '{csv_path}' does not exist; expected columns path,label,split (split = query|database)"
        )
    rows = []
    for line_num, row in _read_csv_rows(
        csv_path, {"path": ("path",), "label": ("label",), "split": ("split",)}
    ):
        labels = [label.strip() for label in row["label"].split("|") if label.strip()]
        rows.append((row["path"], labels, _check_split(csv_path, line_num, row["split"])))
    return build_retrieval_set(csv_path.parent if root is None else root, rows, source=str(csv_path))


def load_wikiart(root, csv_name: str = "wikiart.csv") -> RetrievalSet:
    """WikiArt style retrieval, label = artist (docs/style.md#evaluation-protocol; CSD `data/wikiart.py`).

    `root/csv_name` needs a split column (query|database), an image column `path` (or, failing that,
    `name`) and a label column `artist` (or `label`). The official loader opens `path` as written
    (absolute paths on the authors' machines); here a relative path is taken relative to `root`.
    The paper's split has 64,090 database / 16,006 query images over 1,119 artists; artists absent from
    the database are dropped, as in the official loader.
    """
    root = Path(root)
    csv_path = root / csv_name
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"WikiArt annotation '{csv_path}' does not exist; expected columns path (or name), artist (or label) "
            "and split (query|database); the official csv is not public"
        )
    required = {"path": ("path", "name"), "label": ("artist", "label"), "split": ("split",)}
    rows = [
        (row["path"], [row["label"]] if row["label"] else [], _check_split(csv_path, line_num, row["split"]))
        for line_num, row in _read_csv_rows(csv_path, required)
    ]
    return build_retrieval_set(root, rows, source=str(csv_path))


def load_domainnet(root, split_file, exclude_domains=("quickdraw",)) -> RetrievalSet:
    """DomainNet style retrieval, label = domain = the first component of the image path
    (docs/style.md#evaluation-protocol).

    The official split (content classes clustered with word2vec; 20,000 queries / 206,768 database
    images) was never released (learn2phoenix/CSD#9), so the split comes from `split_file`: a CSV
    with header `path,split`, paths relative to `root` and starting with the domain folder, e.g.
    `clipart/aircraft_carrier/clipart_001_000001.jpg,query`. A relative split_file is taken relative to
    root. Rows of `exclude_domains` are skipped and counted (the paper drops Quickdraw, too close to Sketch).
    """
    root = Path(root)
    split_path = Path(split_file)
    if not split_path.is_absolute():
        split_path = root / split_path
    if not split_path.is_file():
        raise FileNotFoundError(
            f"DomainNet split file '{split_path}' does not exist; expected a CSV with columns path,split where "
            "path starts with the domain folder (e.g. clipart/aircraft_carrier/x.jpg) and split is query|database"
        )
    excluded = set(exclude_domains)
    rows, num_excluded = [], 0
    for line_num, row in _read_csv_rows(split_path, {"path": ("path",), "split": ("split",)}):
        domain = Path(row["path"]).parts[0] if row["path"] else ""
        if domain in excluded:
            num_excluded += 1
            continue
        rows.append(
            (row["path"], [domain] if domain else [], _check_split(split_path, line_num, row["split"]))
        )
    if num_excluded:
        log.info(
            "%s: skipped %d images of the excluded domains %s", split_path, num_excluded, sorted(excluded)
        )
    return build_retrieval_set(root, rows, source=str(split_path))
