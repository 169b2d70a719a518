"""What every affect_jax builder shares: manual dir, array_record output, bad-data policy."""

from __future__ import annotations

import inspect

from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from affect_jax.data.builders.bad_data import BadDataLog, LayoutError

DEFAULT_FILE_FORMAT = "array_record"


def source_file_path(cls: type) -> epath.Path:
  """Path of the file defining ``cls``.

  TFDS 4.9.10's ``DatasetBuilder.code_path`` references the ``importlib_resources`` backport, which
  is only installed on Python < 3.9, and fails for every builder living in a package; builders
  here answer from ``inspect`` instead (what TFDS itself falls back to).
  """
  return epath.Path(inspect.getfile(cls))


class ManualDirBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders here: reads a user-supplied manual dir, writes array_record.

  Constructor keywords (besides TFDS's): ``bad_data`` ("error" raises on the first bad entry
  naming file and line; "skip" skips, counts and logs each one) and ``verify_decode`` (fully decode
  every image with Pillow instead of only checking its start/end markers). Left as None they come
  from the builder config when it has such fields, else "error" / False. The policy and every
  skipped entry are saved in the dataset's ``metadata.json`` (``builder.info.metadata``).
  """

  def __init__(self, *, file_format=None, bad_data: str | None = None,
               verify_decode: bool | None = None, **kwargs):
    super().__init__(file_format=file_format or DEFAULT_FILE_FORMAT, **kwargs)
    config = self.builder_config
    self.bad_data = BadDataLog(bad_data or getattr(config, "bad_data", None) or "error")
    if verify_decode is None:
      verify_decode = bool(getattr(config, "verify_decode", False))
    self.verify_decode = verify_decode

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pytype: disable=signature-mismatch
    return source_file_path(cls)

  def dataset_info(self, features: tfds.features.FeaturesDict, description: str,
                   **kwargs) -> tfds.core.DatasetInfo:
    """DatasetInfo shared by the builders here.

    ``disable_shuffling``: records are written in the order they are generated (each builder
    documents its order) instead of TFDS's hash order, so record i is the same on every build.
    """
    return tfds.core.DatasetInfo(
        builder=self,
        description=description,
        features=features,
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
        **kwargs,
    )

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    # Runs after every split was generated and before TFDS writes the info files.
    self.info.metadata["bad_data"] = self.bad_data.summary()

  def manual_root(self, dl_manager: tfds.download.DownloadManager) -> epath.Path:
    """The manual dir, or a LayoutError naming it and showing the expected layout."""
    try:
      return dl_manager.manual_dir
    except AssertionError as error:
      raise LayoutError(
          f"{self.name}: {error}\nExpected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      ) from None


def require(path: epath.Path, what: str, layout: str) -> epath.Path:
  """``path`` if it exists, else a LayoutError showing the expected layout."""
  if not path.exists():
    raise LayoutError(f"missing {what}: {path}\nExpected layout:\n{layout}")
  return path


def require_records(count: int, source: epath.PathLike) -> None:
  """LayoutError when ``source`` yielded no usable record (TFDS cannot write an empty split)."""
  if count == 0:
    raise LayoutError(f"{source}: no usable records (empty, or every entry was skipped)")
