"""Attacks on trained diffusion models: generate-and-filter extraction and membership inference
(docs/attacks.md)."""
