"""Callbacks that turn the module's last scored retrieval into a gallery image and a saved embeddings file."""

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from src.plots import draw_retrieval_gallery, save_figure
from src.utils.embeddings import save_embeddings

log = logging.getLogger(__name__)


class RetrievalGallery(L.Callback):
    """After each validation/test run (its `_end` hook comes after the module scored the epoch), draw `num_queries` queries (spread over labels) with their top-5
    matches, save it under `<run>/galleries/` and log it to W&B when a W&B logger is active."""

    def __init__(self, num_queries: int = 8, stages: tuple[str, ...] = ("val", "test")):
        self.num_queries = num_queries
        self.stages = stages

    def on_validation_end(self, trainer, pl_module):
        self._draw(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module):
        self._draw(trainer, pl_module, "test")

    @rank_zero_only
    def _draw(self, trainer, pl_module, stage: str) -> None:
        result = getattr(pl_module, "last_retrieval", None)
        if stage not in self.stages or result is None or result["stage"] != stage or trainer.sanity_checking:
            return
        rset = result["set"]
        q_labels = rset.query_labels[result["query_index"]]
        first_label = q_labels.float().argmax(1)
        # one query per label first, so the gallery shows many styles rather than one
        order = torch.cat([torch.nonzero(first_label == lab).flatten()[:1] for lab in first_label.unique()])
        rows = order[: self.num_queries].tolist()
        db_rows = result["database_index"]
        query_paths = [rset.query[int(result["query_index"][r])] for r in rows]
        match_rows = [[int(db_rows[j]) for j in result["top5"][r]] for r in rows]
        match_paths = [[rset.database[j] for j in row] for row in match_rows]
        hits = [
            [
                bool((rset.query_labels[int(result["query_index"][r])] & rset.database_labels[j]).any())
                for j in row
            ]
            for r, row in zip(rows, match_rows, strict=True)
        ]
        titles = [rset.label_names[int(first_label[r])][:24] for r in rows]
        fig = draw_retrieval_gallery(rset.root, query_paths, match_paths, hits, titles)
        path = Path(trainer.default_root_dir) / "galleries" / f"{stage}_step{trainer.global_step:07d}.png"
        save_figure(fig, path, dpi=80)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"{stage}/gallery", images=[str(path)], step=trainer.global_step)


class SaveEmbeddings(L.Callback):
    """After the test stage, write `<run>/embeddings/test.npz` (see src.utils.embeddings) for notebooks and
    re-scoring with `python -m src.evaluate embeddings=<file>`."""

    def __init__(self, half: bool = False):
        self.half = half

    @rank_zero_only
    def on_test_end(self, trainer, pl_module):
        result = getattr(pl_module, "last_retrieval", None)
        if result is None or result["stage"] != "test":
            return
        rset = result["set"]
        path = save_embeddings(
            Path(trainer.default_root_dir) / "embeddings" / "test.npz",
            result["query_embeddings"],
            result["database_embeddings"],
            rset.query_labels[result["query_index"]],
            rset.database_labels[result["database_index"]],
            rset.label_names,
            [rset.query[i] for i in result["query_index"].tolist()],
            [rset.database[i] for i in result["database_index"].tolist()],
            root=rset.root,
            descriptor=f"csd:{pl_module.hparams.backbone.get('name')}",
            half=self.half,
        )
        log.info(f"Saved test embeddings to {path}")
