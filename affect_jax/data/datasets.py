"""Where each stage's data comes from: the user's folders, or the built-in synthetic default.

With `config.data.affwild2_dir` empty, synthetic face videos (and face-image datasets) are generated
once into `<data root>/synthetic`. Either way the TFDS datasets are built once into
`<data root>/tfds` and reused by every later stage.
"""

import dataclasses
import json
import os

from absl import logging
import jax
import tensorflow_datasets as tfds

from affect_jax import processes
from affect_jax.data import builders
from affect_jax.data import synthetic

# Folder names tried, in order, for each face dataset inside config.data.faces_dir.
FACE_FOLDERS = {
    "affectnet": ("AffectNet", "affectnet"),
    "rafdb": ("RAF-DB", "RAF_DB", "raf_db", "rafdb"),
    "fer2013": ("FER2013", "fer2013"),
    "ferplus": ("FERPlus", "FER+", "ferplus", "FER2013", "fer2013"),
}
SYNTHETIC_NOTICE = (
    "Running on the built-in SYNTHETIC face videos (no dataset folder configured). To use Aff-Wild2, "
    "pass your copy: --config=configs/<stage>.py:affwild2=/path/to/Aff-Wild2,faces=/path/to/faces")


@dataclasses.dataclass(frozen=True)
class DataPaths:
  tfds_dir: str
  affwild2_dir: str
  face_dirs: dict  # dataset name -> manual dir (only datasets that are present)
  synthetic: bool


def data_root(config, workdir):
  return config.data.root or os.path.join(workdir, "data")


def generate_synthetic(config, root):
  """Generates the synthetic default once (a finished run leaves its summary file)."""
  out = os.path.join(root, "synthetic")
  summary = synthetic.summary_path(out)
  cfg = config.data.synthetic
  # Face images split as AffectNet 40 %, RAF-DB 30 %, FER2013/FER+ 30 %.
  affectnet = int(round(0.4 * cfg.face_images))
  rafdb = int(round(0.3 * cfg.face_images))
  kwargs = dict(num_videos=cfg.videos, frames_per_video=cfg.frames, seed=cfg.seed,
                affectnet_images=affectnet, rafdb_images=rafdb, fer2013_images=cfg.face_images - affectnet - rafdb,
                va_delay_seconds=tuple(cfg.va_delay_seconds))
  if not os.path.exists(summary):
    logging.info("Generating %d synthetic videos of ~%d frames and %d face images into %s",
                 cfg.videos, cfg.frames, cfg.face_images, out)
    synthetic.generate(out, **kwargs)
  with open(summary) as f:
    existing = json.load(f)
  # Data made with other settings is never silently reused (older summaries carry no settings).
  made = existing.get("settings")
  wanted = synthetic.generation_settings(**kwargs)
  if made is not None:
    differ = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k, v) != v}
    if differ:
      raise ValueError(
          f"{summary}: the synthetic data there was generated with other settings ("
          + "; ".join(f"{k}: {a} there, {b} in config.data.synthetic" for k, (a, b) in differ.items())
          + "). Use another workdir (or data.root), or the settings it was made with; nothing was changed.")
  return out, existing


def locate(config, workdir):
  """The folders to read (generating the synthetic data if needed); builds nothing."""
  root = data_root(config, workdir)
  if config.data.affwild2_dir:
    affwild2_dir = config.data.affwild2_dir
    if not os.path.isdir(affwild2_dir):
      raise FileNotFoundError(f"config.data.affwild2_dir={affwild2_dir} is not a folder")
    faces_root = config.data.faces_dir
    is_synthetic = False
  else:
    out, summary = generate_synthetic(config, root)
    affwild2_dir = os.path.join(out, summary["roots"]["aff_wild2"])
    faces_root = config.data.faces_dir or out
    is_synthetic = True
  face_dirs = {}
  if faces_root:
    if not os.path.isdir(faces_root):
      raise FileNotFoundError(f"config.data.faces_dir={faces_root} is not a folder")
    present = set(os.listdir(faces_root))
    for name, folders in FACE_FOLDERS.items():
      folder = next((f for f in folders if f in present), None)
      if folder:
        face_dirs[name] = os.path.join(faces_root, folder)
  return DataPaths(os.path.join(root, "tfds"), affwild2_dir, face_dirs, is_synthetic)


def prepare(config, workdir, *, faces=False):
  """Builds (or reuses) the Aff-Wild2 TFDS datasets, and the face datasets when `faces`.

  Several processes (jax.distributed): process 0 generates the synthetic data (when configured)
  and builds the datasets while the others wait at a barrier
  (`affect_jax.processes.wait_for_all`); then the others open what process 0 built. Where
  they cannot see it (each host has its own disk, not a shared filesystem), each builds its own
  copy into the same path; generation and building are deterministic, so every copy is the same.
  Every process must call this (it is a collective).
  """
  if jax.process_count() == 1:
    return _prepare(config, workdir, faces)
  if jax.process_index() == 0:
    paths = _prepare(config, workdir, faces)
    processes.wait_for_all("datasets prepared by process 0")
    return paths
  processes.wait_for_all("datasets prepared by process 0")
  if not os.path.exists(os.path.join(data_root(config, workdir), "tfds")):
    logging.info("Process %d does not see the datasets process 0 built (no shared filesystem): "
                 "building its own copy.", jax.process_index())
  return _prepare(config, workdir, faces)


def _prepare(config, workdir, faces):
  paths = locate(config, workdir)
  for view in ("frames", "videos"):
    builders.build("affwild2", paths.affwild2_dir, paths.tfds_dir, view, bad_data=config.data.bad_data)
  if faces:
    for name, manual_dir in paths.face_dirs.items():
      builders.build(name, manual_dir, paths.tfds_dir, bad_data=config.data.bad_data)
  return paths


def affwild2_splits(paths, view):
  """Split names of the built `affwild2/<view>` dataset."""
  return sorted(tfds.builder(f"affwild2/{view}", data_dir=paths.tfds_dir).info.splits)


def open_source(paths, name, split):
  """Random-access source of a built dataset, e.g. ('affwild2/frames', 'train')."""
  return tfds.data_source(name, split=split, data_dir=paths.tfds_dir)
