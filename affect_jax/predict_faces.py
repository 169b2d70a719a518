"""Frames in, aligned 112x112 faces out: decoding, face detection, choice of face, alignment.

Decoding: video files with PyAV (FFmpeg); a folder of frames or one image with Pillow; a camera
index with OpenCV's VideoCapture.

Detection: MTCNN (the `mtcnn` package, whose weights ship inside the wheel, on TensorFlow) by
default, because it returns the five landmarks the similarity alignment needs and found the face in
every frame of the astronaut test video; OpenCV's Haar cascade (`--detector=haar`, weights in
`cv2.data`) is the fast fallback without landmarks (box-based alignment). Frames are detected in
batches at most `DETECT_SIZE` pixels on the long side (MTCNN costs ~0.12 s per 256x256 frame in a
batch of 8 on 2 CPU cores, ~0.6 s one by one).

Alignment: a 4-degree-of-freedom similarity (rotation, uniform scale, shift; least squares,
`cv2.estimateAffinePartial2D`) maps the five points onto the standard 112x112 template of
ArcFace/InsightFace crops, the format of Aff-Wild2's `cropped_aligned` faces.

Several faces: the one overlapping most with the previous frame's face (IoU >= 0.3) is kept, so the
subject does not switch; otherwise the largest face.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

from absl import logging
import numpy as np
from PIL import Image

ALIGNED_SIZE = 112
# Five points (left eye, right eye, nose tip, left and right mouth corners; "left" = image left) of
# the ArcFace/InsightFace 112x112 crop.
TEMPLATE_112 = np.asarray([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                           [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
DETECT_SIZE = 320
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DETECTORS = ("mtcnn", "haar")
MIN_CONFIDENCE = 0.9
TRACK_IOU = 0.3
BOX_FRACTION = 0.8
BOX_CENTRE = (56.0, 62.0)


class InputError(ValueError):
  """An input that cannot be read as frames (names the file and the problem)."""


@dataclasses.dataclass
class Frame:
  index: int          # 0-based
  time_s: float
  rgb: np.ndarray     # uint8 [H, W, 3]


@dataclasses.dataclass
class Face:
  box: np.ndarray             # x, y, w, h in frame pixels
  landmarks: np.ndarray | None  # [5, 2] in TEMPLATE_112 order, or None (box-only detector)
  score: float


# --- decoding -----------------------------------------------------------------------------------


class FrameSource:
  """Iterates the frames of a video file, a folder of images, an image, or a camera."""

  def __init__(self, path: str, fps: float = 30.0, max_frames: int | None = None):
    self.path = path
    self.fps = float(fps)
    self.max_frames = max_frames
    self.num_frames = None  # known ahead for files and folders
    self.kind = self._kind()

  def _kind(self):
    if self.path.isdigit():
      return "camera"
    if not os.path.exists(self.path):
      raise InputError(f"{self.path}: no such file or folder")
    if os.path.isdir(self.path):
      self._files = sorted(f for f in os.listdir(self.path) if f.lower().endswith(IMAGE_EXTENSIONS))
      if not self._files:
        raise InputError(f"{self.path}: a folder without image files ({', '.join(IMAGE_EXTENSIONS)})")
      self.num_frames = len(self._files)
      return "folder"
    if self.path.lower().endswith(IMAGE_EXTENSIONS):
      self.num_frames = 1
      return "image"
    import av  # pylint: disable=g-import-not-at-top
    try:
      with av.open(self.path) as container:
        if not container.streams.video:
          raise InputError(f"{self.path}: has no video stream")
        stream = container.streams.video[0]
        if stream.average_rate:
          self.fps = float(stream.average_rate)
        self.num_frames = int(stream.frames) or None
    except av.error.FFmpegError as e:
      raise InputError(f"{self.path}: not a readable video ({type(e).__name__}: {e})") from e
    return "video"

  def __len__(self):
    n = self.num_frames or 0
    return min(n, self.max_frames) if self.max_frames else n

  def __iter__(self) -> Iterator[Frame]:
    frames = {"video": self._video, "folder": self._folder, "image": self._folder,
              "camera": self._camera}[self.kind]()
    for frame in frames:
      if self.max_frames is not None and frame.index >= self.max_frames:
        return
      yield frame

  def _video(self):
    import av  # pylint: disable=g-import-not-at-top
    count = 0
    try:
      with av.open(self.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for count, frame in enumerate(container.decode(stream)):
          t = float(frame.time) if frame.time is not None else count / self.fps
          yield Frame(count, t, frame.to_ndarray(format="rgb24"))
        decoded = count + 1 if count or self.num_frames else 0
    except av.error.FFmpegError as e:
      raise InputError(f"{self.path}: decoding failed after frame {count} ({type(e).__name__}: {e}); "
                       "the file is damaged or truncated") from e
    if self.num_frames and decoded < self.num_frames and not self.max_frames:
      raise InputError(f"{self.path}: the container announces {self.num_frames} frames but only {decoded} "
                       "could be decoded; the file is truncated")

  def _folder(self):
    files = [os.path.basename(self.path)] if self.kind == "image" else self._files
    root = os.path.dirname(self.path) if self.kind == "image" else self.path
    for i, name in enumerate(files):
      path = os.path.join(root, name)
      try:
        with Image.open(path) as image:
          rgb = np.asarray(image.convert("RGB"))
      except OSError as e:
        raise InputError(f"{path}: not a readable image ({e})") from e
      yield Frame(i, i / self.fps, rgb)

  def _camera(self):
    import cv2  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    capture = cv2.VideoCapture(int(self.path))
    if not capture.isOpened():
      raise InputError(f"camera {self.path}: cannot be opened")
    start = time.perf_counter()
    try:
      i = 0
      while True:
        ok, bgr = capture.read()
        if not ok:
          return
        yield Frame(i, time.perf_counter() - start, bgr[:, :, ::-1].copy())
        i += 1
    finally:
      capture.release()


# --- detection ----------------------------------------------------------------------------------


class Detector:
  """Detects faces in batches of RGB frames; see the module docstring for the choice."""

  def __init__(self, kind: str = "mtcnn"):
    if kind not in DETECTORS:
      raise ValueError(f"detector must be one of {DETECTORS}, got {kind!r}")
    self.kind = kind
    if kind == "mtcnn":
      from mtcnn import MTCNN  # pylint: disable=g-import-not-at-top
      self._mtcnn = MTCNN(device="CPU:0")
    else:
      import cv2  # pylint: disable=g-import-not-at-top
      self._cascade = cv2.CascadeClassifier(
          os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))

  def detect(self, frames: list[np.ndarray]) -> list[list[Face]]:
    import cv2  # pylint: disable=g-import-not-at-top
    scaled, scales = [], []
    for rgb in frames:
      scale = min(1.0, DETECT_SIZE / max(rgb.shape[:2]))
      scales.append(scale)
      scaled.append(rgb if scale == 1.0 else cv2.resize(
          rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), interpolation=cv2.INTER_AREA))
    if self.kind == "mtcnn":
      same_shape = len({s.shape for s in scaled}) == 1
      results = self._mtcnn.detect_faces(scaled) if same_shape and len(scaled) > 1 else [
          self._mtcnn.detect_faces(s) for s in scaled]
      out = []
      for found, scale in zip(results, scales):
        faces = []
        for f in found:
          if f["confidence"] < MIN_CONFIDENCE:
            continue
          k = f["keypoints"]
          points = np.asarray([k["left_eye"], k["right_eye"], k["nose"], k["mouth_left"], k["mouth_right"]],
                              np.float32) / scale
          faces.append(Face(np.asarray(f["box"], np.float32) / scale, points, float(f["confidence"])))
        out.append(faces)
      return out
    out = []
    for small, scale in zip(scaled, scales):
      grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
      boxes = self._cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
      out.append([Face(np.asarray(b, np.float32) / scale, None, 1.0) for b in boxes])
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
  ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
  w = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
  h = max(0.0, min(ay2, by2) - max(a[1], b[1]))
  inter = w * h
  union = a[2] * a[3] + b[2] * b[3] - inter
  return float(inter / union) if union > 0 else 0.0


def choose_face(faces: list[Face], previous: Face | None) -> Face | None:
  """The face continuing `previous` (IoU >= TRACK_IOU), else the largest one."""
  if not faces:
    return None
  if previous is not None:
    overlaps = [iou(f.box, previous.box) for f in faces]
    best = int(np.argmax(overlaps))
    if overlaps[best] >= TRACK_IOU:
      return faces[best]
  return max(faces, key=lambda f: f.box[2] * f.box[3])


# --- alignment ----------------------------------------------------------------------------------


def similarity_from_landmarks(landmarks: np.ndarray) -> np.ndarray:
  """2x3 similarity (least squares) mapping the five landmarks onto TEMPLATE_112."""
  import cv2  # pylint: disable=g-import-not-at-top
  matrix, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks, np.float32), TEMPLATE_112, method=cv2.LMEDS)
  if matrix is None:
    raise ValueError(f"no similarity transform fits landmarks {landmarks.tolist()}")
  return matrix


def similarity_from_box(box: np.ndarray) -> np.ndarray:
  """2x3 scale+shift putting a detector box where the template's face sits (no landmarks).

  A frontal Haar box spans about brow to chin; BOX_FRACTION of the crop side, centred a little
  below the crop's centre, puts eyes and mouth near the template's rows (approximate: no rotation).
  """
  x, y, w, h = [float(v) for v in box]
  scale = BOX_FRACTION * ALIGNED_SIZE / max(w, h)
  cx, cy = BOX_CENTRE
  return np.asarray([[scale, 0.0, cx - scale * (x + w / 2)],
                     [0.0, scale, cy - scale * (y + h / 2)]], np.float32)


def align_face(rgb: np.ndarray, face: Face) -> np.ndarray:
  """The 112x112 aligned crop (uint8 RGB) of `face` in `rgb`."""
  import cv2  # pylint: disable=g-import-not-at-top
  matrix = similarity_from_landmarks(face.landmarks) if face.landmarks is not None else similarity_from_box(face.box)
  return cv2.warpAffine(rgb, matrix, (ALIGNED_SIZE, ALIGNED_SIZE), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
