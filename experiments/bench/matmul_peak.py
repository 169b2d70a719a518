r"""Figure 7: the machine's float32 matmul limit, and each model's achieved GFLOP/s as a fraction.

  python -m experiments.bench.matmul_peak [--quick] [--n=2048] [--rounds=15]

Contenders: a jitted 2048^2 float32 `jnp.dot` and numpy's `@` (OpenBLAS) on the same arrays,
alternated; GFLOP per call 2 n^3. Then the figures of this run (their JSON summaries in
--summary_dir: vit_forward, mae_step_B, mae_step_tiny, temporal_step) are divided by the JAX
matmul rate: ViT-B/16 forward counted as 35.1 GFLOP per 224^2 image, the training steps by XLA's
cost analysis of our compiled step (the same work is credited to the PyTorch side). Run it last
(run_all does), or after the figures it reads.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness

N = flags.DEFINE_integer("n", 2048, "Matrix side.")

FIGURES = ("vit_forward", "mae_step_B", "mae_step_tiny", "temporal_step")


def main(argv):
  del argv
  n = 512 if harness.QUICK.value else N.value
  a_np = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
  b_np = np.random.default_rng(1).normal(size=(n, n)).astype(np.float32)
  dot = jax.jit(jnp.dot)

  def make_jax():
    a, b = jax.device_put(a_np), jax.device_put(b_np)
    return lambda: jax.block_until_ready(dot(a, b))

  def make_numpy():
    out = np.empty((n, n), np.float32)
    return lambda: np.matmul(a_np, b_np, out=out)

  gflop = 2 * n**3 / 1e9
  rounds, warmup = harness.settings(15, 3)
  summary = harness.compare(
      "matmul_peak", f"float32 matmul peak ({n}^2)",
      [harness.Contender("jnp.dot (XLA CPU)", make_jax, 1, "matmuls", gflop),
       harness.Contender("numpy @ (OpenBLAS)", make_numpy, 1, "matmuls", gflop)],
      rounds=rounds, warmup=warmup, setting=f"{gflop:.1f} GFLOP per call, float32")
  peak = summary["rows"][0]["gflops"]
  rows = []
  for figure in FIGURES:
    s = harness.read_summary(figure)
    if s is None or s["quick"] != harness.QUICK.value:
      rows.append(f"| {figure} | not run in this run | | |")
      continue
    for row in s["rows"]:
      if row["gflops"] is None or "matmul" in row["name"]:
        continue
      rows.append(f"| {s['title']} | {row['name']} | {row['gflops']:.1f} | **{row['gflops'] / peak:.0%}** |")
  text = harness.header(
      "Achieved GFLOP/s as a fraction of the measured JAX matmul peak",
      f"peak = jnp.dot {n}^2 median {peak:.1f} GFLOP/s (table above); ViT-B/16 forward counted as "
      "35.1 GFLOP per 224^2 image; training steps by XLA's cost analysis of our step (both sides "
      "credited the same work); medians of each figure's rounds in this run") + "\n".join([
          "| figure | contender | GFLOP/s | fraction of peak |", "|---|---|---|---|", *rows]) + "\n"
  harness.append_text(text)


if __name__ == "__main__":
  app.run(main)
