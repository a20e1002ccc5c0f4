"""OmegaConf resolvers used by the configs in conf/.

`${project_root:}` is the repository root (the folder that holds `src/`), so paths never depend on the working directory.
`${join_name:a,b}` joins a run name with Hydra's override string (`model.lr=0.1,seed=2`), skipping empty parts.
"""

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _join_name(*parts) -> str:
    return "-".join(str(p) for p in parts if p not in (None, ""))


def register_resolvers() -> None:
    """Register the resolvers once per process (Hydra may import this module several times)."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("join_name"):
        OmegaConf.register_new_resolver("join_name", _join_name)
