"""The import layering of src/: a room imports only rooms at its own level or below, and src/metrics imports
nothing else from src (pure functions on tensors)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Highest first: entry points, then the harness, then the library, then run plumbing.
LEVELS = [
    {"train", "evaluate", "sample", "replicate", "attack", "detect", "attribute", "extract"},
    {"callbacks", "models", "replication", "generation", "attacks", "detection"},
    {"metrics", "nn", "losses", "data", "mitigations", "plots"},
    {"utils"},
]


def room_of(module: str) -> str:
    """`src.data.style.retrieval` -> `data`; `src.plots` -> `plots`."""
    return module.split(".")[1]


def level_of(room: str) -> int:
    for level, rooms in enumerate(LEVELS):
        if room in rooms:
            return level
    raise AssertionError(f"src/{room} is in no level of tests/test_layers.py: place it")


def imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("src."):
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.startswith("src.")]
    return names


def test_every_import_points_down_or_sideways():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts == ("__init__",):
            continue
        room = parts[0]
        for name in imports_of(path):
            if level_of(room_of(name)) < level_of(room):
                upward.append(f"src/{path.relative_to(SRC)} imports {name}")
    assert not upward, "imports from a lower room to a higher one:\n" + "\n".join(upward)


def test_metrics_imports_nothing_else_from_src():
    outside = [
        f"{path.relative_to(SRC)}: {name}"
        for path in sorted((SRC / "metrics").rglob("*.py"))
        for name in imports_of(path)
        if room_of(name) != "metrics"
    ]
    assert not outside, outside


def test_the_layering_test_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from src.callbacks.diffusion import ReplicationAnalysis\nimport src.train\n")
    assert [level_of(room_of(n)) for n in imports_of(bad)] == [1, 0]
