"""The style attribution study (experiments/style_attribution/run.py) end to end on a tiny text-to-image run."""

import pytest


@pytest.mark.slow
def test_the_style_study_runs_end_to_end_on_tiny_models(tiny_run, data_dir, tmp_path):
    from tests.conftest import ROOT, TINY_BENCH, load_script

    study = load_script(ROOT / "experiments" / "style_attribution" / "run.py", "style_attribution_run")
    t2i = tiny_run("t2i_quickstart").run_dir / "checkpoints" / "last.ckpt"
    summary = study.main(
        [
            f"--t2i={t2i}",
            "--simple-seeds=2",
            "--content-seeds=1",
            "--sample-steps=2",
            "--descriptors=color_hist",  # any extractor goes through src.attribute alike (tests/test_attribution.py)
            f"--data-dir={data_dir}",
            "--bench",
            str(TINY_BENCH["image_size"]),
            str(TINY_BENCH["images_per_style"]),
            f"--out={tmp_path}",
        ]
    )
    s = summary["color_hist"]
    assert s["difference_lo"] <= s["difference"] <= s["difference_hi"]
    assert -1 <= s["content_vs_simple_r"] <= 1 and len(s["gss"]) == 16
    assert 0 <= s["attributed_real"] <= 1 and len(list((tmp_path / "generated" / "real").iterdir())) == 16
    assert len(list((tmp_path / "generated" / "simple").iterdir())) == 16
    assert (tmp_path / "results.md").is_file() and (tmp_path / "gss.png").is_file()
