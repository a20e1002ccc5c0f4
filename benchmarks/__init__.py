"""Speed benchmarks, not installed with the package: run each from the repository root as
`python -m benchmarks.<name>`."""
