"""Two processes joined by jax.distributed run the stages as one process does.

Temporal stage: `python -m affect_jax.main` runs the VA stage of the smoke config three times on
a tiny feature store: as two processes with 2 faked CPU devices each (coordinator on 127.0.0.1),
and as one process with 4 devices, both on the mesh (4, 1, 1). Four training videos of exactly one
window each and a global batch of 4 make every step's global batch the whole training set in both
runs (only the order of its rows differs), so with dropout and window jitter off the runs must
agree.

Smoke chain: the same two processes run data -> MAE -> fine-tuning -> extraction from nothing.
Their training cannot equal a one-process run (each process reads its own share of the images,
so the global batches differ in content and order, and with them the MAE masks); the test shows
what must hold instead: both processes log the same losses and scores, only process 0 generates
the data and writes logs and pictures, and one process extracting with the two-process fine-tuned
checkpoint writes the same feature store.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np

from affect_jax.models import temporal as temporal_lib
from affect_jax.train import checkpointing
from affect_jax.train import optimizer as optimizer_lib
from affect_jax.train import trainer
from conftest import FEATURE_DIM, write_tiny_store
from configs import va

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = ("--config.num_train_steps=3", "--config.eval_every_epochs=3", "--config.jitter=False",
             "--config.model.dropout=0.0", "--config.model.tcn_dropout=0.0")
# The smoke window is 30 frames: one window per training video. Validation: 2 windows, 2, 1 (padded).
VIDEOS = {"train": [(f"{i}-30-640x360", 30) for i in range(1, 5)],
          "validation": [("5-30-640x360", 50), ("6-30-640x360", 41), ("7-30-640x360", 25)]}
LOSS_LINE = re.compile(r"\[(\d+)\] .*train/loss=([-+0-9.eE]+)")
# Unoptimised CPU code generation: compile time is most of these runs.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, num_devices, distributed_flags=(), config="configs/va.py:size=smoke",
            overrides=OVERRIDES):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  command = [sys.executable, "-m", "affect_jax.main", f"--config={config}",
             f"--workdir={workdir}", *overrides, *distributed_flags]
  # Output goes to a file, not a pipe: a process blocked on a full pipe that nobody reads (while
  # the test waits on the other one) would block the other in its next collective.
  output = tempfile.TemporaryFile("w+")
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                             text=True)
  process.output_file = output
  return process


def _two_processes(workdir, **kwargs):
  port = _free_port()
  flags = lambda i: (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                     f"--process_id={i}")
  return {f"process {i} of 2": _launch(workdir, 2, flags(i), **kwargs) for i in range(2)}


def _finish(process, name):
  try:
    process.wait(timeout=400)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
  process.output_file.seek(0)
  output = process.output_file.read()
  process.output_file.close()
  assert process.returncode == 0, f"{name} failed:\n{output[-6000:]}"
  return output


def _logged_losses(output):
  return {int(step): float(loss) for step, loss in LOSS_LINE.findall(output)}


def _restore_on_one_device(stage_dir):
  """The newest checkpoint of `stage_dir`, restored into this (one-device) test process."""
  config = va.get_config("size=smoke")
  model = temporal_lib.temporal_model_from_config(config.model, 2)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, steps_per_epoch=1)
  mesh = trainer.make_mesh(config.mesh, jax.devices()[:1])
  inputs = dict(features=jax.ShapeDtypeStruct((4, config.window, FEATURE_DIM), np.float32),
                frame_mask=jax.ShapeDtypeStruct((4, config.window), np.bool_))
  abstract, _, _ = trainer.abstract_train_state(model, tx, inputs, jax.random.key(0), mesh)
  checkpointer = checkpointing.Checkpointer(os.path.join(stage_dir, "checkpoints"), async_save=False)
  try:
    step, state = checkpointer.restore(abstract)
  finally:
    checkpointer.close()
  return step, state


def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
  two, one = tmp_path / "two_processes", tmp_path / "one_process"
  for workdir in (two, one):
    write_tiny_store(workdir, VIDEOS)
  runs = _two_processes(two)
  runs["one process"] = _launch(one, 4)
  outputs = {name: _finish(process, name) for name, process in runs.items()}

  losses = {name: _logged_losses(output) for name, output in outputs.items()}
  print(json.dumps(losses))
  assert "process 1 of 2, devices" in outputs["process 1 of 2"]  # jax.distributed joined them
  assert losses["process 0 of 2"] == losses["process 1 of 2"] and set(losses["process 0 of 2"]) == {3}
  np.testing.assert_allclose(losses["process 0 of 2"][3], losses["one process"][3], rtol=1e-5)

  # Validation covers every frame of every video through both processes' shares.
  scores = {name: json.loads((workdir / "va" / "scores.json").read_text())
            for name, workdir in (("two", two), ("one", one))}
  assert [h["step"] for h in scores["two"]["history"]] == [3]
  assert scores["two"]["latest"]["num_frames"] == scores["one"]["latest"]["num_frames"] == sum(
      n - len(range(0, n, 7)) for _, n in VIDEOS["validation"])  # every valid label of every frame
  for key in ("p_va", "ccc_valence", "ccc_arousal"):
    np.testing.assert_allclose(scores["two"]["latest"][key], scores["one"]["latest"][key], atol=1e-5)

  # Only process 0 writes TensorBoard events; both save their Grain iterator into the checkpoint.
  assert len([p for p in (two / "va").iterdir() if p.name.startswith("events.out.tfevents")]) == 1
  data_files = sorted(p.name for p in (two / "va" / "checkpoints" / "3" / "data").iterdir()
                      if p.name.startswith("process_"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"], data_files

  # The two-process checkpoint restores in this one-process, one-device test and equals the other.
  step_two, state_two = _restore_on_one_device(two / "va")
  step_one, state_one = _restore_on_one_device(one / "va")
  assert step_two == step_one == 3 and int(state_two.step) == 3
  flat_one = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state_one.params)[0]}
  for path, value in jax.tree_util.tree_flatten_with_path(state_two.params)[0]:
    name = jax.tree_util.keystr(path)
    if name.endswith("['key']['bias']"):
      continue  # no gradient in exact arithmetic; Adam amplifies rounding noise (see test_sharding)
    np.testing.assert_allclose(np.asarray(value), np.asarray(flat_one[name]), atol=1e-5, err_msg=name)


# The training and validation scalars the stages log: "[3] train/loss=..., ...", "[3] val/...".
SCALARS_LINE = re.compile(r"logging_writer.py:\d+\] (\[\d+\] (?:train|val)/.*)$", re.MULTILINE)


def _store(workdir):
  """{split: [record]} of the feature store in W/features, as numpy."""
  from affect_jax.data import feature_store  # pylint: disable=g-import-not-at-top
  store = {}
  for split in ("train", "validation", "test"):
    source = feature_store.open_feature_store(os.path.join(workdir, "features"), split)
    store[split] = [{k: np.asarray(v) for k, v in source[i].items()} for i in range(len(source))]
  return store


def test_two_processes_run_the_smoke_chain_and_extract_what_one_process_extracts(tmp_path):
  two, one = tmp_path / "two_processes", tmp_path / "one_process"
  outputs = {name: _finish(process, name) for name, process in
             _two_processes(two, config="configs/extract.py:size=smoke", overrides=()).items()}

  # Both processes ran the same global steps: identical losses, picture loss and EXPR scores.
  scalars = {name: SCALARS_LINE.findall(output) for name, output in outputs.items()}
  print(json.dumps(scalars))
  assert scalars["process 0 of 2"] == scalars["process 1 of 2"]
  logged = " ".join(scalars["process 0 of 2"])
  assert logged.count("train/loss=") == 2  # MAE and fine-tuning
  assert "val/picture_loss=" in logged and "val/expr_f1=" in logged
  # Process 0 generated the synthetic data; process 1 waited for it and found it (shared disk).
  assert "Generating 6 synthetic videos" in outputs["process 0 of 2"]
  assert "Generating" not in outputs["process 1 of 2"]
  assert "does not see the datasets" not in outputs["process 1 of 2"]
  # Only process 0 writes TensorBoard events (with the MAE's reconstruction pictures).
  for stage in ("mae_pretrain", "mae_finetune"):
    events = [p for p in (two / stage).iterdir() if p.name.startswith("events.out.tfevents")]
    assert len(events) == 1, (stage, events)
  (mae_events,) = (two / "mae_pretrain").glob("events.out.tfevents*")
  assert b"reconstructions" in mae_events.read_bytes()

  # One process with 4 devices extracts with the two processes' fine-tuned encoder.
  for stage in ("data", "mae_finetune"):
    shutil.copytree(two / stage, one / stage, symlinks=True)
  _finish(_launch(one, 4, config="configs/extract.py:size=smoke", overrides=()), "one process")
  store_two, store_one = _store(two), _store(one)
  assert [len(store_two[s]) for s in store_two] == [len(store_one[s]) for s in store_one] == [
      4, 2, 3]
  for split, records in store_two.items():
    for record, reference in zip(records, store_one[split]):
      assert sorted(record) == sorted(reference)
      for key, value in record.items():
        if key == "features":
          assert value.shape == (int(record["num_frames"]), FEATURE_DIM) and value.std() > 0
          np.testing.assert_allclose(value, reference[key], atol=1e-5, err_msg=f"{split} {key}")
        else:
          np.testing.assert_array_equal(value, reference[key], err_msg=f"{split} {key}")
