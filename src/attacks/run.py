"""One attack on a loaded module and its training run's datamodule: what `python -m src.attack` and the
end-of-training callback (src/callbacks/attacks.py) share."""

import json
from pathlib import Path

from src.attacks.extraction import candidate_prompts, duplicated_prompts, run_adaptive, run_extraction
from src.attacks.membership import membership_sets, run_membership
from src.utils.run import to_float_dict

MEMBERSHIP_ATTACKS = ("loss", "secmi", "pia", "pian")


def flat_numbers(summary: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested summary as {"a/b": value}, for metrics.json and the loggers."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{prefix}{key}/"))
        elif key != "options":
            out.update({f"{prefix}{k}": v for k, v in to_float_dict({key: value}).items()})
    return out


def default_generations(run_dir, module, options: dict) -> Path | None:
    """Where extraction and adaptive generate their candidates: `options["generations"]`, else
    <run>/samples/attack_<sampler><steps>_seed<seed>[_<mitigation>] beside the run's other samples (shared by
    both attacks when their settings agree: the folders are keyed by content, so sharing is safe). None for the
    membership attacks, which generate nothing."""
    if options["name"] in MEMBERSHIP_ATTACKS:
        return None
    if options.get("generations"):
        return Path(options["generations"])
    sampler = options.get("sampler") or module.hparams.sampler
    steps = options.get("steps") or module.hparams.sample_steps
    mitigation = options.get("inference_mitigation") or "none"
    suffix = "" if mitigation == "none" else f"_{mitigation}"
    return Path(run_dir) / "samples" / f"attack_{sampler}{steps}_seed{options['seed']}{suffix}"


SHARED_KEYS = ("name", "batch_size", "use_ema", "bootstrap")


def membership(module, options: dict, out_dir, run_dir) -> dict:
    """A membership attack: the run's training subset against its held-out images (`membership_sets`)."""
    if run_dir is None:
        raise ValueError(f"attack={options['name']} needs the training run folder (its subset_index.json)")
    members, nonmembers, member_paths, nonmember_paths, member_prompts, nonmember_prompts = membership_sets(
        run_dir, module.hparams.image_size
    )
    name = options["name"]
    kwargs = {k: v for k, v in options.items() if k not in SHARED_KEYS}
    if name == "pia" and kwargs.pop("normal", False):
        name = "pian"
    summary = run_membership(
        module,
        members,
        nonmembers,
        [name],
        {name: kwargs},
        out_dir,
        member_paths,
        nonmember_paths,
        member_prompts,
        nonmember_prompts,
        batch_size=options["batch_size"],
        use_ema=options["use_ema"],
        bootstrap=options["bootstrap"],
        seed=options.get("seed", 0),
    )
    return {
        "attack": options["name"],
        "num_members": len(members),
        "num_nonmembers": len(nonmembers),
        **summary,
    }


def attack_module(
    module,
    datamodule,
    options: dict,
    out_dir,
    run_dir=None,
    generations=None,
    duplicates_extractor=None,
    device="cpu",
):
    """Run the attack `options["name"]` on a loaded module and its run's datamodule; returns its summary. Used by
    the entry point and by the end-of-training callback. `generations`: where the candidates are generated
    (default out_dir/generations)."""
    name = options["name"]
    out_dir = Path(out_dir)
    if name in MEMBERSHIP_ATTACKS:
        return membership(module, options, out_dir, run_dir)
    if name == "adaptive":
        return run_adaptive(module, datamodule, out_dir, options, generations=generations)
    conditional = hasattr(module, "encode_prompts")
    prompts = None
    if conditional:
        source = options["prompts"]
        kind = source if source in ("training", "duplicated") else "file"

        def mine(dm, by_image, count):
            return duplicated_prompts(
                dm,
                by_image,
                count,
                options["duplicate_threshold"],
                duplicates_extractor.to(device).eval(),
                device,
            )

        prompts = candidate_prompts(
            kind, datamodule, options["num_prompts"], prompts_file=source, duplicates=mine
        )
        if not prompts:
            raise ValueError(f"attack.prompts={source!r} gives no prompt to attack")
    weights = None
    if run_dir is not None and (Path(run_dir) / "sampling_weights.json").is_file():
        weights = json.loads((Path(run_dir) / "sampling_weights.json").read_text())
    return run_extraction(
        module, datamodule, out_dir, options, prompts, generations=generations, weights=weights
    )
