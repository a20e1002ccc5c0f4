"""Callbacks for diffusion modules: sample grids during training, and the replication analysis when it ends.

Both work with any module that has `generate(seeds, sampler=None, steps=None, use_ema=True) -> uint8 (B, H, W, C)`
and `hparams.sampler` / `hparams.sample_steps` (the unconditional DDPM, the text-conditional model).
"""

import csv
import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from src.mitigations import mitigation_tag
from src.plots import draw_similarity_histogram, image_grid, save_figure
from src.utils.checkpoints import state_digest

log = logging.getLogger(__name__)


def log_image_file(trainer: L.Trainer, key: str, path: Path) -> None:
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # W&B
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)


class SampleGrid(Callback):
    """Every `every_n_steps` optimizer steps (and at the end of training), sample `num_images` from fixed seeds and
    save `<run>/samples/grid_step<N>.png` (logged to W&B when used). Fixed seeds make grids comparable over time."""

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_images: int = 16,
        seed: int = 0,
        sampler: str | None = None,
        steps: int | None = None,
        columns: int = 8,
    ):
        self.every_n_steps, self.num_images, self.seed = every_n_steps, num_images, seed
        self.sampler, self.steps, self.columns = sampler, steps, columns
        self._last = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last and step > 0:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last:
            self.draw(trainer, pl_module)

    def draw(self, trainer, pl_module) -> None:
        self._last = trainer.global_step
        if not trainer.is_global_zero:
            return
        seeds = list(range(self.seed, self.seed + self.num_images))
        extra = {}
        if hasattr(trainer.datamodule, "train_prompts"):  # text-conditional: fixed training prompts
            extra["prompts"] = trainer.datamodule.train_prompts(self.num_images, seed=self.seed)[0]
        images = pl_module.generate(seeds, sampler=self.sampler, steps=self.steps, **extra)
        path = Path(trainer.default_root_dir) / "samples" / f"grid_step{trainer.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, self.columns).save(path)
        log_image_file(trainer, "samples/grid", path)


class CaptionLog(Callback):
    """At the start of training, write `<run>/captions_fed.csv`: `num_draws` training draws with the image, its
    caption 0 and the caption the model is fed after conditioning, duplication and mitigation
    (docs/memorization.md#caption-mitigations), and log it as a W&B table. Does nothing for datamodules
    without `caption_log` (unconditional data)."""

    def __init__(self, num_draws: int = 32):
        self.num_draws = num_draws

    def on_fit_start(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if not trainer.is_global_zero or not hasattr(datamodule, "caption_log"):
            return
        rows = datamodule.caption_log(self.num_draws)
        path = Path(trainer.default_root_dir) / "captions_fed.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "caption_0", "fed"])
            writer.writerows(rows)
        log.info("captions fed to the model (first 3 of %d in %s): %s", len(rows), path, rows[:3])
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):  # W&B
                columns = ["path", "caption_0", "fed"]
                logger.log_table(key="data/captions_fed", columns=columns, data=[list(r) for r in rows])


def read_top1(report_dir: Path) -> list[float]:
    with open(report_dir / "matches.csv") as f:
        return [float(row["sim_1"]) for row in csv.DictReader(f)]


class ReplicationAnalysis(Callback):
    """When training ends: generate `num_images`, then run the replication analysis (src/replication/analysis.py)
    against the module's training images and against held-out control images it never saw
    (docs/memorization.md#ddpm-on-nested-subsets).

    The datamodule exposes `root` (folder), `train_files` and, when it holds images out, `control_files` (paths
    relative to root), as `ImageFolderDataModule` does. Reports go to `<run>/replication/{train,control}/`, the
    generations to `<run>/samples/final/`, a histogram of both to `<run>/replication/train_vs_control.png`. The
    statistics are logged as `replication/train/<stat>` and `replication/control/<stat>` and land in metrics.json.

    Text-conditional runs (a datamodule with `train_prompts`, as `CaptionedDataModule`): the generations use the
    training prompts drawn as DCR does (docs/memorization.md#generation-protocol, seeded by `prompt_seed`),
    the reports split the statistics by up-weighted training images when the data saved sampling weights, and
    `clip_score` / `fid` (options of `analyse_replication`) can be switched on. Each of
    `inference_mitigations` ({name: gni | rt | cwr | rna | prompt_embedding | ..., optional label, options},
    docs/memorization.md#inference-time-mitigations) generates again into `samples/final_<label>/` and is
    reported as `replication/inference_<label>/`; the label defaults to the name, so two settings of one
    mitigation need labels of their own.
    """

    def __init__(
        self,
        extractor,
        num_images: int = 1000,
        seed: int = 1_000_000,
        sampler: str | None = None,
        steps: int | None = None,
        batch_size: int = 64,
        threshold: float = 0.5,
        k: int = 5,
        gallery_size: int = 8,
        control: bool = True,
        feature_batch_size: int = 64,
        cache_dir: str | None = None,
        prompt_seed: int = 42,
        inference_mitigations: list | None = None,
        clip_score: dict | None = None,
        fid: dict | None = None,
    ):
        self.extractor = extractor
        self.num_images, self.seed, self.sampler, self.steps = num_images, seed, sampler, steps
        self.batch_size, self.threshold, self.k, self.gallery_size = batch_size, threshold, k, gallery_size
        self.control, self.feature_batch_size, self.cache_dir = control, feature_batch_size, cache_dir
        self.prompt_seed = prompt_seed
        self.inference_mitigations = [dict(m) for m in (inference_mitigations or [])]
        tags = [mitigation_tag(m) for m in self.inference_mitigations]
        repeated = sorted({t for t in tags if tags.count(t) > 1})
        if repeated:
            raise ValueError(
                f"inference_mitigations: {repeated} appear more than once, and each writes samples/final_<label>/: "
                "give each setting its own `label` (e.g. {name: prompt_embedding, label: pe_target_0.4, ...})"
            )
        self.clip_score, self.fid = clip_score, fid

    def on_fit_end(self, trainer, pl_module) -> None:
        """Every rank generates its index range of each folder; then rank 0 analyses while the others wait at a
        barrier without the process group's timeout (Lightning's default 30 min would end a long analysis)."""
        from lightning.fabric.utilities.distributed import _InfiniteBarrier

        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            trainer.strategy.barrier()
            return
        self.generate(trainer, pl_module, part=trainer.global_rank, parts=trainer.world_size)
        trainer.strategy.barrier()  # the parts are equal in size, so this wait is short
        with _InfiniteBarrier():  # __exit__ waits for rank 0's analysis, on every rank
            if trainer.is_global_zero:
                metrics = self.analyse(trainer, pl_module)
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
                trainer.callback_metrics.update(
                    {k: torch.tensor(v) for k, v in metrics.items() if v is not None}
                )

    def _setting(self, trainer):
        """(prompts or None, sampling weights file or None, [(report tag, folder name, mitigation options)])."""
        datamodule = trainer.datamodule
        prompts = weights = None
        if hasattr(datamodule, "train_prompts"):
            prompts = datamodule.train_prompts(self.num_images, seed=self.prompt_seed)[0]
            weights_file = getattr(datamodule.hparams, "weights_file", None)
            weights = weights_file if weights_file and Path(weights_file).is_file() else None
        variants = [("train", "final", {"name": "none"})]
        for m in self.inference_mitigations:
            label = mitigation_tag(m)
            options = {k: v for k, v in m.items() if k != "label"}
            variants.append((f"inference_{label}", f"final_{label}", options))
        return prompts, weights, variants

    def generate(self, trainer, pl_module, part: int = 0, parts: int = 1) -> None:
        """Generate this rank's index range of every folder (`generate_to_folder`: images already there are kept)."""
        from src.generation import generate_to_folder

        prompts, _, variants = self._setting(trainer)
        digest = state_digest(pl_module)  # keys every generation folder; computed once
        for _, folder_name, mitigation in variants:
            generate_to_folder(
                pl_module,
                Path(trainer.default_root_dir) / "samples" / folder_name,
                self.num_images,
                seed=self.seed,
                sampler=self.sampler,
                steps=self.steps,
                batch_size=self.batch_size,
                prompts=prompts,
                inference_mitigation=mitigation,
                checkpoint=f"end of training, step {trainer.global_step}",
                weights_sha256=digest,
                part=part,
                parts=parts,
            )

    def analyse(self, trainer, pl_module) -> dict[str, float]:
        """The reports of the folders `generate` filled (on every rank, before this); the metrics logged."""
        from src.replication.analysis import analyse_replication

        run_dir = Path(trainer.default_root_dir)
        datamodule = trainer.datamodule
        extractor = self.extractor.to(pl_module.device).eval()
        prompts, weights, variants = self._setting(trainer)
        control_files = getattr(datamodule, "control_files", [])
        if self.control and not control_files:
            log.warning(
                "no held-out control images in this datamodule: only the training images are analysed"
            )
        metrics, top1, sizes = {}, {}, {}
        for tag, folder_name, _ in variants:
            folder = run_dir / "samples" / folder_name
            sets = {tag: datamodule.train_files}
            if tag == "train" and self.control and control_files:
                sets["control"] = control_files
            for name, files in sets.items():
                out = run_dir / "replication" / name
                stats = analyse_replication(
                    extractor,
                    folder,
                    datamodule.root,
                    out,
                    train_files=files,
                    k=self.k,
                    threshold=self.threshold,
                    gallery_size=self.gallery_size,
                    batch_size=self.feature_batch_size,
                    device=pl_module.device,
                    cache_dir=self.cache_dir,
                    prompts=folder / "prompts.json" if prompts else None,
                    sampling_weights=weights if name != "control" else None,
                    clip_score=self.clip_score if prompts else None,
                    fid=self.fid,
                )
                numbers = {
                    k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
                metrics.update({f"replication/{name}/{k}": float(v) for k, v in numbers.items()})
                top1[name], sizes[name] = read_top1(out), len(files)
                log.info(
                    "replication vs %s (%d images): sim_95pc=%.4f sim_gt_thr=%.4f",
                    name,
                    len(files),
                    stats["sim_95pc"],
                    stats["sim_gt_thr"],
                )
        title = f"{sizes['train']} training images, step {trainer.global_step}"
        series = [
            (top1.get("control"), "top-1 sim vs held-out control", "tab:blue"),
            (top1["train"], "top-1 sim vs training subset", "tab:red"),
        ]
        fig = draw_similarity_histogram(series, self.threshold, title=title)
        path = save_figure(fig, run_dir / "replication" / "train_vs_control.png", dpi=120)
        summary = {
            "num_train": sizes["train"],
            "num_control": sizes.get("control", 0),
            "num_generated": self.num_images,
            "step": trainer.global_step,
            "inference_mitigations": self.inference_mitigations,
            "metrics": metrics,
        }
        (run_dir / "replication" / "summary.json").write_text(json.dumps(summary, indent=2))
        log_image_file(trainer, "replication/train_vs_control", path)
        return metrics
