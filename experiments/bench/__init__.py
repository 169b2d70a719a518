"""Side-by-side benchmarks of affect_jax against PyTorch and the machine's limit (issue 8).

Run one figure with `python -m experiments.bench.<name> [--quick]`, all of them with
`python -m experiments.bench.run_all`; every figure appends to experiments/bench/RESULTS.md.
"""
