r"""Where the time of our MAE pre-training step goes, by kind of compiled thunk (not a side-by-side figure).

  python -m experiments.bench.profile_mae_step [--presets=B (mae_step's flag)] [--calls=2] [--top=8] [--trace_dir=DIR]

The step of figure 2 (`mae_step.make_ours`: the MAE stage's own compiled step, AdamW, donated
state; batch from mae_step's --batch_B / --batch_tiny), traced for --calls steps after two warm-up
steps with `jax.profiler`; XLA's thunk time is summed per kind as in `profile_vit_forward`. Then,
for the kinds that are not matmuls, the --top thunks with their shapes and the op they came from
(e.g. the transposes XLA copies in front of the weight-gradient matmuls, the optimiser's fusions).
"""

from absl import app
from absl import flags

from experiments.bench import mae_step
from experiments.bench import profile_vit_forward as profile

TOP = flags.DEFINE_integer("top", 8, "Thunks listed per kind.")
KINDS = ("copy_bitcast_fusion", "multiply_add_fusion", "broadcast_divide_fusion", "transpose_copy_fusion")


def main(argv):
  del argv
  for preset in mae_step.PRESETS.value:
    config, batch = mae_step.preset_config(preset)
    call, _, _ = mae_step.make_ours(config, batch)
    for _ in range(2):
      call()
    wall, kinds, thunks, threads = profile.thunk_times(call, call.compiled_text())
    print(f"\n## MAE pre-training step, preset {preset}, batch {batch}\n")
    per_call = profile.print_kinds(kinds)
    print(f"\nwall {wall / 1e6:.0f} ms per traced step; thunk time {per_call / 1e6:.0f} ms per step on "
          f"{threads} threads")
    for kind in KINDS:
      mine = sorted(((ns, key[1:]) for key, ns in thunks.items() if key[0] == kind), reverse=True)
      if not mine:
        continue
      total = sum(ns for ns, _ in mine) / profile.CALLS.value / 1e6
      print(f"\n{kind}: {len(mine)} thunks, {total:.0f} ms per step; the largest:")
      for ns, (name, shape, op_name) in mine[:TOP.value]:
        print(f"  {ns / profile.CALLS.value / 1e6:6.1f} ms  {name}  {shape}  {op_name[-100:]}")


if __name__ == "__main__":
  flags.FLAGS.set_default("calls", 2)
  app.run(main)
