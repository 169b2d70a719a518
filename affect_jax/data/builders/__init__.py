"""TFDS builders of affect_jax: one folder per dataset, each usable by the ``tfds build`` CLI.

    tfds build affect_jax/data/builders/affwild2 --manual_dir=/data/affwild2 --data_dir=/data/tfds
    tfds build affect_jax/data/builders/affwild2 --config=videos --manual_dir=... --data_dir=...

or from Python with ``build(name, manual_dir, data_dir, config)``. Output is array_record (also the
builders' default, so the command line needs no ``--file_format``); readers open random-access
sources with ``tfds.data_source("affwild2/frames", split=..., data_dir=...)`` or
``builder.as_data_source(split)``, without importing this package.

The ``tfds`` executable of tensorflow-datasets 4.9.10 imports apache_beam when it starts
(tensorflow/datasets issue #5463), so it runs only where apache-beam is installed; ``build`` does
not need it, and the tests drive the command's own loader and build routine in-process.
"""

from __future__ import annotations

import functools
import importlib
import os

from etils import epath
import tensorflow_datasets as tfds

_MODULES = {
    name: f"affect_jax.data.builders.{name}.{name}_dataset_builder"
    for name in ("affwild2", "affectnet", "rafdb", "fer2013", "ferplus")
}
NAMES = tuple(_MODULES)


def builder_class(name: str) -> type[tfds.core.GeneratorBasedBuilder]:
  """The Builder class of dataset ``name`` (one of NAMES); importing it registers it with TFDS."""
  if name not in _MODULES:
    raise ValueError(f"unknown dataset {name!r}; expected one of {NAMES}")
  return importlib.import_module(_MODULES[name]).Builder


def build(
    name: str,
    manual_dir: os.PathLike | str,
    data_dir: os.PathLike | str,
    config: str | tfds.core.BuilderConfig | None = None,
    *,
    bad_data: str | None = None,
    verify_decode: bool | None = None,
    overwrite: bool = False,
) -> tfds.core.DatasetBuilder:
  """Builds dataset ``name`` from ``manual_dir`` into ``data_dir`` as array_record; returns the builder.

  Args:
    name: one of NAMES.
    manual_dir: the user's copy of the dataset (layout in the builder's MANUAL_DOWNLOAD_INSTRUCTIONS).
    data_dir: TFDS data dir to write to (``<data_dir>/<name>/<config>/<version>/``).
    config: builder config (affwild2: "frames" or "videos"); None = the builder's default.
    bad_data: "error" (default) raises on bad input naming file and line; "skip" skips, counts and
      logs each bad entry (summary in ``builder.info.metadata["bad_data"]``).
    verify_decode: also fully decode every image with Pillow (slower; default checks markers only).
    overwrite: rebuild even if the dataset already exists (otherwise it is reused).
  """
  make_builder = functools.partial(
      builder_class(name), data_dir=os.fspath(data_dir), config=config, bad_data=bad_data,
      verify_decode=verify_decode, file_format="array_record")
  builder = make_builder()
  if overwrite and builder.is_prepared():
    # A builder made over an existing dataset has its info fixed; start from an empty folder.
    epath.Path(builder.data_dir).rmtree()
    builder = make_builder()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return builder
