"""Detection of memorized prompts (docs/detection.md): the detectors (`detectors`) and running them on a
model and its training run (`run`)."""
