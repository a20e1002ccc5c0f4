"""Style attribution: GSS and the per-image reading on hand-worked values, and `python -m src.attribute` on tiny
folders with the bad input it must name."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from src.metrics.attribution import attribute, general_style_similarity, gss_interval, prototype
from tests.conftest import compose_config


def test_gss_with_raw_prototypes_is_the_mean_pairwise_dot_product():
    torch.manual_seed(0)
    refs, gens = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    figures = general_style_similarity(refs, gens)
    pairwise = torch.stack([r @ g for r in refs for g in gens]).double().mean()
    assert figures["gss_raw"] == pytest.approx(float(pairwise))
    p, q = refs.double().mean(0), gens.double().mean(0)
    assert figures["gss_unit"] == pytest.approx(float(p @ q / p.norm() / q.norm()))
    assert prototype(refs)["unit"].norm() == pytest.approx(1.0)


def test_per_image_similarity_is_read_with_the_papers_thresholds():
    refs = torch.tensor([[1.0, 0.0]])
    angles = torch.tensor([0.0, 0.5, 1.2])  # cosines 1.0, 0.878, 0.362
    gens = torch.stack([angles.cos(), angles.sin()], dim=1)
    figures = general_style_similarity(refs, gens)
    assert figures["share_present"] == pytest.approx(2 / 3) and figures["share_absent"] == pytest.approx(
        1 / 3
    )
    assert figures["image_mean"] == pytest.approx(float(angles.cos().mean()), abs=1e-6)
    lo, hi = gss_interval(refs, gens, draws=200)
    assert lo <= figures["gss_raw"] <= hi
    index, best = attribute(gens, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert index.tolist() == [0, 0, 1]


def test_embeddings_of_different_dimensions_name_both_shapes():
    with pytest.raises(ValueError, match=r"8 dimensions \(\(5, 8\)\).*6 \(\(3, 6\)\)"):
        general_style_similarity(torch.randn(5, 8), torch.randn(3, 6))


def paint(folder, colour, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        noise = rng.integers(-40, 40, size=(24, 24, 3))
        Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def test_attribute_writes_the_table_heat_map_and_galleries_and_names_what_it_left_out(tmp_path, monkeypatch):
    from src.attribute import attribute_styles
    from tests.test_notebooks import run_notebook

    refs, gen = tmp_path / "refs", tmp_path / "gen"
    colours = {"seurat": (200, 60, 60), "mucha": (60, 60, 200), "amano": (60, 200, 60)}
    for i, (artist, colour) in enumerate(colours.items()):
        paint(refs / artist, colour, 4, i)
        paint(gen / "sd14" / artist, colour, 3, 10 + i)
    paint(gen / "sd21" / "seurat", colours["mucha"], 3, 20)  # a generator that misses the style
    paint(gen / "sd21" / "klimt", (0, 0, 0), 2, 21)  # no references for klimt
    (refs / "empty").mkdir()  # an artist folder without any image
    (refs / "broken").mkdir()
    (refs / "broken" / "0.png").write_bytes(b"not a png")
    cfg = compose_config(
        "attribute.yaml",
        [f"references={refs}", f"generated={gen}", "extractor=color_hist", "bootstrap=50", "num_workers=0"],
        tmp_path / "run",
    )
    result = attribute_styles(cfg)
    assert sorted(result["excluded_artists"]) == ["broken", "empty"]
    assert result["unmatched_folders"] == ["sd21/klimt"]
    rows = {(r["column"], r["artist"]): r for r in result["rows"]}
    assert set(rows) == {("sd14", "seurat"), ("sd14", "mucha"), ("sd14", "amano"), ("sd21", "seurat")}
    assert all(rows[("sd14", a)]["attributed"] == 1.0 for a in colours)
    assert rows[("sd21", "seurat")]["attributed"] == 0.0
    assert rows[("sd14", "seurat")]["gss_raw"] > rows[("sd21", "seurat")]["gss_raw"]
    run = tmp_path / "run"
    for name in ("gss.csv", "gss.md", "heatmap.png", "gallery_sd14.png", "gallery_sd21.png", "metrics.json"):
        assert (run / name).is_file(), name
    assert "| seurat |" in (run / "gss.md").read_text()
    assert json.loads((run / "metrics.json").read_text())["unmatched_folders"] == ["sd21/klimt"]
    outputs, text, figures = run_notebook("style_attribution.ipynb", monkeypatch, RUN_DIR=run)
    assert f"Run: {run}" in text and len(figures) >= 4  # heat map, reading bars, two galleries


def test_attribute_refuses_generations_without_any_matching_artist(tmp_path):
    from src.attribute import attribute_styles

    paint(tmp_path / "refs" / "seurat", (200, 60, 60), 2, 0)
    paint(tmp_path / "gen" / "sd14" / "nobody", (0, 0, 0), 2, 1)
    cfg = compose_config(
        "attribute.yaml",
        [
            f"references={tmp_path / 'refs'}",
            f"generated={tmp_path / 'gen'}",
            "extractor=color_hist",
            "num_workers=0",
        ],
        tmp_path / "run",
    )
    with pytest.raises(ValueError, match="no generated folder is named after an artist"):
        attribute_styles(cfg)


def test_the_style_study_splits_styles_and_captions_only_the_learned_ones(data_dir, tmp_path):
    from src.data.embedded.style_bench import build_style_bench
    from tests.conftest import ROOT, TINY_BENCH, load_script

    study = load_script(ROOT / "experiments" / "style_attribution" / "run.py", "style_attribution_run")
    learned, unseen = study.split_styles()
    assert len(learned) == len(unseen) == 8 and not set(learned) & set(unseen)
    bench = build_style_bench(
        data_dir, TINY_BENCH["seed"], TINY_BENCH["image_size"], TINY_BENCH["images_per_style"]
    )
    count = study.write_captions(bench, learned, tmp_path / "captions.json")
    captions = json.loads((tmp_path / "captions.json").read_text())
    assert count == len(captions) > 0
    for path, (caption,) in captions.items():
        style = path.split("/")[0]
        assert (
            style in learned
            and caption.endswith(f"in the style of {style}")
            and (bench / "images" / "train" / path).is_file()
        )


def test_the_gss_interval_matches_resampling_by_hand():
    from src.metrics.attribution import gss_interval

    torch.manual_seed(1)
    refs, gens = F.normalize(torch.randn(4, 6), dim=1), F.normalize(torch.randn(7, 6), dim=1)
    for key in ("gss_raw", "gss_unit"):
        picks = np.random.default_rng(3).integers(0, 7, (300, 7))
        by_hand = [general_style_similarity(refs, gens[torch.from_numpy(p)])[key] for p in picks]
        assert gss_interval(refs, gens, key, draws=300, seed=3) == pytest.approx(
            tuple(np.percentile(by_hand, [2.5, 97.5])), abs=1e-9
        )


def test_style_study_prompts_name_their_artists():
    from src.data.style.prompts import artists_named, style_prompts, user_prompts

    simple = style_prompts(["Seurat", "Mucha"], "simple", 3)
    assert len(simple) == 6 and simple[0] == ("A painting in the style of Seurat", ["Seurat"])
    dogs = style_prompts(["Seurat"], "dog", 2)
    assert len(dogs) == 10 and dogs[0][0] == "A portrait of a dog in the style of Seurat"
    assert artists_named("a cat, by seurat and Alphonse MUCHA", ["Seurat", "Mucha", "Amano"]) == [
        "Seurat",
        "Mucha",
    ]
    assert artists_named("Seuratism", ["Seurat"]) == []  # whole words only
    kept = user_prompts(["a cat by Seurat", "a dog", "", "Mucha poster"], ["Seurat", "Mucha"])
    assert kept == [("a cat by Seurat", ["Seurat"]), ("Mucha poster", ["Mucha"])]
    assert len(user_prompts(["Seurat"] * 10, ["Seurat"], max_prompts=4)) == 4
    with pytest.raises(ValueError, match="expected simple, woman, dog or house"):
        style_prompts(["Seurat"], "cat", 1)


@pytest.mark.slow
def test_the_sd_style_study_generates_and_scores_with_a_tiny_stable_diffusion(tiny_sd_dir, tmp_path):
    from tests.conftest import ROOT, TINY_SD, load_script

    study = load_script(ROOT / "experiments" / "sd_style_study" / "run.py", "sd_style_study_run")
    colours = {"Seurat": (200, 60, 60), "Mucha": (60, 60, 200)}
    rows = []
    for i, (artist, colour) in enumerate(colours.items()):
        paint(tmp_path / "db" / artist, colour, 3, i)
        rows += [f"{artist}/{j}.png,{artist}" for j in range(3)]
    (tmp_path / "db" / "styles.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "artists.txt").write_text("Seurat\nMucha\n")
    (tmp_path / "user.txt").write_text("a cat by Seurat\na dog\nMucha and Seurat together\n")
    args = [
        f"--pretrained={tiny_sd_dir}",
        f"--artists={tmp_path / 'artists.txt'}",
        f"--database={tmp_path / 'db' / 'styles.csv'}",
        f"--user-prompts={tmp_path / 'user.txt'}",
        "--settings=simple",  # the user prompts' selection is tested on its own
        "--simple-repeats=2",
        f"--image-size={TINY_SD['image_size']}",
        "--steps=2",
        "--device=cpu",
        "--name=color_hist",
        "--extractor",
        "extractor=color_hist",
        "num_workers=0",
        f"--out={tmp_path / 'out'}",
    ]
    scores = study.main(args)
    assert set(scores) == {"simple"}
    assert len(list((tmp_path / "out" / "generated" / "simple").glob("*.png"))) == 4
    assert json.loads((tmp_path / "out" / "prompts" / "user.json").read_text()) == [
        ["Seurat"],
        ["Seurat", "Mucha"],
    ]
    assert all(0 <= m["mAP@1"] <= 1 and 0 < m["recall@100"] <= 1 for m in scores.values())
    assert "| simple |" in (tmp_path / "out" / "results.md").read_text()
    assert study.main(args) == scores  # finished steps are read again, not redone
