r"""Synthetic stand-in for Aff-Wild2 and four face-image datasets, in their real on-disk layouts.

Nobody can download Aff-Wild2 here, so the project ships a generator whose output has exactly the
layout, file formats and quirks of the real data, and whose faces carry a learnable, known signal.

Usage::

  python -m affect_jax.data.synthetic --out DIR [--videos 24] [--frames 600] [--seed 0]

or ``affect_jax.data.synthetic.generate(DIR, num_videos=..., frames_per_video=..., seed=...)``.

Output (``DIR/``; the face-dataset folders are the names the configs' ``faces=`` folder expects)::

  Aff-Wild2/                                  the Aff-Wild2 root (point the reader here)
    cropped_aligned/<video>/00001.jpg ...     112x112 JPEG faces, 1-based, 5 digits
    cropped_aligned_new_50_vids/<video>/...   ~15 % of the videos
    6th_ABAW_Annotations/{VA_Estimation_Challenge,EXPR_Recognition_Challenge,
                          AU_Detection_Challenge}/{Train_Set,Validation_Set}/<video>.txt
    names_of_videos_in_each_test_set/{Valence_Arousal_Estimation,Expression_Recognition,
                          Action_Unit_Detection}_Challenge_test_set_release.txt  (one id a line)
  AffectNet/{training,validation}.csv         all nine columns; 68 landmarks as "x;y;x;y;..."
  AffectNet/Manually_Annotated_Images/<sub>/<56 hex digits>.jpg   150-260 px photos, face in the box
  RAF-DB/EmoLabel/list_patition_label.txt     "train_00001.jpg 5" / "test_0001.jpg 7"
  RAF-DB/Image/aligned/train_00001_aligned.jpg ...                  100x100
  FER2013/fer2013.csv                         emotion,pixels,Usage (48x48 grey; Training rows first)
  FERPlus/fer2013new.csv                      vote counts, same rows and order as fer2013.csv
  _synthetic_truth/summary.json               the plan: per video its splits per task, image
                                              folder, frame/image counts, missing frames, lag
  _synthetic_truth/<video>.npz                hidden per-frame state (valence, arousal, expr,
                                              au_intensity, au: un-lagged truth), has_image,
                                              lag_frames, and the rater labels before -5/-1

Label lines are ``v,a`` with 3, 4 or 6 decimals (per file) or ``-5,-5``; one EXPR index or
``-1``; twelve ``0``/``1`` or ``-1``. Defaults (24 labelled videos of ~600 frames, 3 test videos,
400/300/300 face images) take about 20 s on one core.

Generative model
----------------
Each *recording* has an id in the real styles (``1-30-1280x720``, ``122-60-1920x1080-5``), a frame
rate (from the id), a background, a lighting gradient, sensor noise, a JPEG quality and, for
low-resolution ids, extra blur. About one recording in seven films two people, giving a
``<id>_left`` / ``<id>_right`` pair (one sequence each, same length and scene, same split).
Each subject has its own identity: skin tone, head shape, hair colour and style, eye spacing and
size, iris colour, brow thickness, nose, mouth size, lip colour, clothes, sometimes glasses.

Hidden per-frame affect state of a subject (``simulate_affect``):

* valence ``v`` and arousal ``a`` = ``tanh`` of a per-video offset plus a slow and a fast
  Gaussian-smoothed noise process (timescales 1.2-4 s and 0.25-0.7 s of video, scaled by the
  frame rate, amplitude varying per video), so they cover the whole of [-1, 1] and differ in
  mean, spread and speed between videos. Arousal also rises a little with |valence|.
* an expression class, a function of (v, a) and two latent event processes: neutral inside a
  radius around (0, 0); Happiness for positive valence; Surprise for high arousal with
  non-negative valence; for negative valence, a slowly switching latent "flavour" picks Anger or
  Fear (high arousal), Anger, Disgust or Sadness (medium) or Sadness (low), Fear and Disgust
  being rare; rare "Other" episodes (a one-sided, contempt-like lip pull) override the rest.
  Over many videos: Neutral ~40 %, Happiness ~24 %, Anger ~10 %, Sadness ~9 %, Surprise ~7 %,
  Other ~5 %, Disgust and Fear ~2 % each (single videos vary a lot, as in the real data).
* the 12 AU intensities in [0, 1] = a linear drive from (v, a) (AU12 and AU6 rise with positive
  valence; AU4, AU15, AU7 with negative valence; AU1, AU2, AU25, AU26 with arousal) plus the
  prototype pattern of the current expression (e.g. Anger: AU4, AU7, AU23, AU24; Sadness: AU1,
  AU4, AU15; Surprise: AU1, AU2, AU25, AU26; Disgust: AU10, AU4) scaled by its strength and
  smoothed over ~0.1 s, plus talking (AU25 oscillating at ~4 Hz during speech episodes), a small
  per-video bias and smooth per-AU noise. An AU is active when its intensity exceeds 0.5.
* blinks (~one per 4 s), gaze drift and small head motion (roll, yaw, scale, shift).

Rendering (``synthetic_faces``): the AUs move the face the way the FACS names say -- AU1/AU2
raise the inner/outer brow, AU4 lowers and draws the brows together (glabella lines), AU6 raises
and reddens the cheeks and narrows the eyes, AU7 tightens the lower lid, AU10 raises the upper lip
and shows teeth, AU12 pulls the lip corners up and out, AU15 pulls them down, AU23/AU24 narrow
and thin the lips, AU25 parts the lips and AU26 drops the jaw. Valence also bends the mouth
directly and arousal opens the eyes (an AU5-like widening; low arousal droops the lids) and
raises the brows, so both are visible over their whole range, at 64 px as well as at 112 px.
Identity, pose, lighting, blur and noise vary moderately and independently of the affect.

Annotations imitate human raters: every label lags the face by a per-video delay of 3-8 frames
(``lag_frames`` in the truth). Optionally (``va_delay_seconds``, off by default) valence and
arousal, annotated continuously with a joystick, lag a further per-video reaction delay
(``va_delay_frames``), so a frame's VA label is best read from the face seconds before it. VA
carries smooth rater noise (sd ~0.05), the expression label is the class rule applied to the noisy
VA at the short lag, and AU labels threshold the lagged intensity plus noise (plus 0.2 % random
flips). Quirks of the real release are reproduced: 1-3 % of frames have no face image (bursts of 1-4
frames), a third of the videos have 1-8 more annotation lines than images at the end, about a third
of the label files hold a run of invalid labels covering 5-15 % of the video (``-5`` VA, ``-1``
EXPR, ``-1`` AU rows; occasionally a single ``-1`` among twelve), videos labelled for only some
tasks, one video (when there are 8 or more) labelled in ``Train_Set`` for VA/AU but in
``Validation_Set`` for EXPR, CRLF or LF line endings and a missing final newline in some files, and
test videos that have images but no labels.

The face datasets are rendered by the same face model from states sampled out of simulated
sequences (no lag, one fresh identity per image), each with its own label code space: AffectNet
0..10 (7 = Contempt, drawn as the one-sided lip pull; 8 None, 9 Uncertain, 10 Non-face with
VA = -2), RAF-DB 1..7, FER2013 0..6 (with ~10 % label noise, as in the original), FER+ vote counts
of 10 raters centred on the true class (non-face rows have an empty image name).

Everything is a function of the arguments: the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import zipfile
from collections.abc import Sequence

import numpy as np
from PIL import Image

from affect_jax.data import synthetic_faces as faces
from affect_jax.data.schema import AU_NAMES, EXPR_CLASSES

# Layout names (SPEC §1 / §3).
AFFWILD2_DIR = "Aff-Wild2"
AFFECTNET_DIR = "AffectNet"
RAFDB_DIR = "RAF-DB"
FER2013_DIR = "FER2013"
FERPLUS_DIR = "FERPlus"
TRUTH_DIR = "_synthetic_truth"
IMAGE_FOLDERS = ("cropped_aligned", "cropped_aligned_new_50_vids")
ANNOTATION_ROOT = "6th_ABAW_Annotations"
TASK_FOLDERS = {"va": "VA_Estimation_Challenge", "expr": "EXPR_Recognition_Challenge",
                "au": "AU_Detection_Challenge"}
TASK_HEADERS = {"va": "valence,arousal", "expr": ",".join(EXPR_CLASSES), "au": ",".join(AU_NAMES)}
SPLIT_FOLDERS = ("Train_Set", "Validation_Set")
TEST_LIST_DIR = "names_of_videos_in_each_test_set"
TEST_LISTS = {"va": "Valence_Arousal_Estimation_Challenge_test_set_release.txt",
              "expr": "Expression_Recognition_Challenge_test_set_release.txt",
              "au": "Action_Unit_Detection_Challenge_test_set_release.txt"}

_E = {name: i for i, name in enumerate(EXPR_CLASSES)}
_A = {name: i for i, name in enumerate(AU_NAMES)}

# Our class names -> each dataset's own code; a class missing from a table is never written there.
AFFECTNET_CODES = {"Neutral": 0, "Happiness": 1, "Sadness": 2, "Surprise": 3, "Fear": 4, "Disgust": 5,
                   "Anger": 6, "Other": 7}
RAFDB_CODES = {"Surprise": 1, "Fear": 2, "Disgust": 3, "Happiness": 4, "Sadness": 5, "Anger": 6, "Neutral": 7}
FER2013_CODES = {"Anger": 0, "Disgust": 1, "Fear": 2, "Happiness": 3, "Sadness": 4, "Surprise": 5, "Neutral": 6}
FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
                   "unknown", "NF")
FERPLUS_OF_CLASS = {"Neutral": "neutral", "Happiness": "happiness", "Surprise": "surprise", "Sadness": "sadness",
                    "Anger": "anger", "Disgust": "disgust", "Fear": "fear", "Other": "contempt"}
AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "facial_landmarks", "expression", "valence", "arousal")

# Intensity each expression adds to each AU at full strength (rows: EXPR_CLASSES order).
_PROTOTYPES = {
    "Anger": {"AU4": 0.6, "AU7": 0.55, "AU23": 0.6, "AU24": 0.55, "AU10": 0.1},
    "Disgust": {"AU4": 0.4, "AU7": 0.3, "AU10": 0.75, "AU15": 0.3, "AU25": 0.3},
    "Fear": {"AU1": 0.55, "AU2": 0.45, "AU4": 0.45, "AU7": 0.3, "AU25": 0.55, "AU26": 0.2},
    "Happiness": {"AU6": 0.45, "AU12": 0.5, "AU10": 0.25, "AU25": 0.2},
    "Sadness": {"AU1": 0.5, "AU4": 0.45, "AU15": 0.6},
    "Surprise": {"AU1": 0.55, "AU2": 0.6, "AU25": 0.5, "AU26": 0.55},
    "Other": {"AU25": 0.2},
}
PROTOTYPE_AU = np.zeros((len(EXPR_CLASSES), len(AU_NAMES)))
for _name, _aus in _PROTOTYPES.items():
  for _au, _w in _aus.items():
    PROTOTYPE_AU[_E[_name], _A[_au]] = _w
AU_THRESHOLD = 0.5
NEUTRAL_RADIUS = 0.65

# Seed-sequence tags: independent random streams per purpose.
_PLAN, _VIDEO, _SCENE, _POOL, _AFFECTNET, _RAFDB, _FER, _VA_DELAY = range(8)


def _rng(seed: int, *tags: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), *tags])


# ----------------------------------------------------------------------------------------------
# Hidden affect state


@dataclasses.dataclass(frozen=True)
class AffectTrack:
  """The hidden, un-lagged state of one subject, one row per frame."""
  valence: np.ndarray     # [T] float in [-1, 1]
  arousal: np.ndarray     # [T]
  expr: np.ndarray        # [T] int, EXPR_CLASSES order
  au_intensity: np.ndarray  # [T, 12] in [0, 1]
  flavour: np.ndarray     # [T] uniform latent picking among the negative expressions
  other: np.ndarray       # [T] 0..1 strength of an "Other" (one-sided lip pull) episode
  blink: np.ndarray       # [T] lid closure 0..1

  @property
  def au(self) -> np.ndarray:
    return (self.au_intensity > AU_THRESHOLD).astype(np.int32)


def _episodes(rng, num_frames, mean_gap, duration_range):
  """0/1 mask of randomly placed episodes (gaps exponential, durations uniform), in frames."""
  mask = np.zeros(num_frames, bool)
  t = int(rng.exponential(mean_gap))
  while t < num_frames:
    d = int(rng.uniform(*duration_range))
    mask[t:t + max(d, 1)] = True
    t += max(d, 1) + int(rng.exponential(mean_gap)) + 1
  return mask


def _smooth(x, sigma):
  """Gaussian smoothing along axis 0 with edge padding."""
  if sigma <= 0.3:
    return x
  half = int(math.ceil(3 * sigma))
  k = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
  k /= k.sum()
  pad = np.pad(x, [(half, half)] + [(0, 0)] * (x.ndim - 1), mode="edge")
  if x.ndim == 1:
    return np.convolve(pad, k, mode="valid")
  return np.stack([np.convolve(pad[:, j], k, mode="valid") for j in range(x.shape[1])], 1)


def classify_expression(valence, arousal, flavour, other) -> np.ndarray:
  """The expression class (EXPR_CLASSES index) of each frame from its affect state.

  Neutral within NEUTRAL_RADIUS of (0, 0); else by region of the valence/arousal plane, the
  latent `flavour` in [0, 1) choosing among the negative-valence classes; `other` > 0.5 wins.
  """
  v, a, u = (np.asarray(x, float) for x in (valence, arousal, flavour))
  out = np.full(v.shape, _E["Neutral"], np.int32)
  strong = np.hypot(v, a) >= NEUTRAL_RADIUS
  happy = strong & (v >= 0.4) & (a < v + 0.45)
  surprise = strong & ~happy & (a >= 0.5) & (v > -0.3)
  negative = strong & ~happy & ~surprise & (v <= -0.3)
  high, low = a > 0.3, a < -0.2
  mid = ~high & ~low
  neg_class = np.select(
      [high & (u < 0.72), high & (u < 0.9), high,
       mid & (u < 0.35), mid & (u < 0.5), mid,
       low & (u < 0.92), low],
      [_E["Anger"], _E["Fear"], _E["Disgust"],
       _E["Anger"], _E["Disgust"], _E["Sadness"],
       _E["Sadness"], _E["Disgust"]])
  out = np.where(happy, _E["Happiness"], out)
  out = np.where(surprise, _E["Surprise"], out)
  out = np.where(negative, neg_class, out)
  out = np.where(np.asarray(other) > 0.5, _E["Other"], out)
  return out.astype(np.int32)


def simulate_affect(rng: np.random.Generator, num_frames: int, fps: float) -> AffectTrack:
  """Samples the hidden affect state of one subject for `num_frames` frames at `fps` (see module doc)."""
  n = num_frames
  slow, fast = fps * rng.uniform(1.2, 4.0), fps * rng.uniform(0.25, 0.7)

  def process(offset, amplitude):
    return offset + amplitude * (0.85 * faces.smooth_noise(rng, n, slow) + 0.35 * faces.smooth_noise(rng, n, fast))

  v_latent = process(rng.normal(0.05, 0.3), rng.uniform(0.5, 1.0))
  a_latent = process(rng.normal(0.05, 0.3), rng.uniform(0.5, 1.0)) + 0.2 * np.abs(v_latent)
  v, a = np.tanh(v_latent), np.tanh(a_latent)

  # The negative-expression flavour switches every 2-6 s.
  flavour = np.empty(n)
  t = 0
  while t < n:
    d = max(1, int(fps * rng.uniform(2, 6)))
    flavour[t:t + d] = rng.uniform()
    t += d
  other_mask = _episodes(rng, n, fps * 35, (fps * 1.0, fps * 3.0)).astype(float)
  other = np.clip(_smooth(other_mask, fps * 0.1) * 1.5, 0, 1)
  expr = classify_expression(v, a, flavour, other)

  strength = np.clip((np.hypot(v, a) - NEUTRAL_RADIUS + 0.15) / 0.4, 0, 1)
  strength = np.where(expr == _E["Other"], other, strength)
  proto = _smooth(np.eye(len(EXPR_CLASSES))[expr] * strength[:, None], fps * 0.1) @ PROTOTYPE_AU

  relu = lambda x: np.maximum(x, 0.0)
  linear = np.zeros((n, len(AU_NAMES)))
  for name, drive in {
      "AU1": 0.45 * relu(a), "AU2": 0.40 * relu(a), "AU4": 0.45 * relu(-v), "AU6": 0.55 * relu(v),
      "AU7": 0.25 * relu(-v) + 0.1 * relu(a), "AU10": 0.1 * relu(-v) + 0.3 * relu(v - 0.3), "AU12": 0.70 * relu(v),
      "AU15": 0.30 * relu(-v), "AU23": 0.1 * relu(-v), "AU24": 0.1 * relu(-v),
      "AU25": 0.1 + 0.45 * relu(a), "AU26": 0.35 * relu(a - 0.2)}.items():
    linear[:, _A[name]] = drive
  talking = _smooth(_episodes(rng, n, fps * 6, (fps * 1.0, fps * 4.0)).astype(float), fps * 0.1)
  phase = rng.uniform(0, 2 * np.pi)
  speech = talking * 0.3 * (0.5 + 0.5 * np.sin(2 * np.pi * 4.0 / fps * np.arange(n) + phase))
  noise = 0.07 * np.stack([faces.smooth_noise(rng, n, fps * 0.4) for _ in AU_NAMES], 1)
  bias = rng.normal(0, 0.04, len(AU_NAMES))
  au = linear + proto + noise + bias
  au[:, _A["AU25"]] += speech
  au = np.clip(au, 0, 1)

  blink = np.zeros(n)
  blink_len = max(2, int(round(fps * 0.12)))
  profile = 1 - np.abs(np.linspace(-1, 1, blink_len + 2)[1:-1]) * 0.5
  for start in np.flatnonzero(_episodes(rng, n, fps * 4, (1, 2))):
    seg = blink[start:start + blink_len]
    blink[start:start + blink_len] = np.maximum(seg, profile[:seg.size])
  return AffectTrack(valence=v, arousal=a, expr=expr, au_intensity=au, flavour=flavour, other=other, blink=blink)


def face_track(affect: AffectTrack, rng: np.random.Generator, fps: float, *, static: bool = False) -> faces.FaceTrack:
  """The renderer's per-frame drivers: affect state plus head pose (one pose per frame if `static`)."""
  n = affect.valence.shape[0]
  if static:
    pose = (rng.normal(0, 4, n), np.clip(rng.normal(0, 0.2, n), -0.6, 0.6), rng.normal(0, 1.5, (n, 2)),
            1 + rng.normal(0, 0.03, n), rng.normal(0, 1.0, (n, 2)) * [1.0, 0.4])
  else:
    pose = faces.sample_pose(rng, n, fps)
  roll, yaw, shift, scale, gaze = pose
  smirk = np.where(affect.expr == _E["Other"], affect.other, 0.5 * affect.other)
  return faces.FaceTrack(au=affect.au_intensity, valence=affect.valence, arousal=affect.arousal,
                         blink=affect.blink, smirk=smirk, gaze=gaze, roll=roll, yaw=yaw, shift=shift, scale=scale)


# ----------------------------------------------------------------------------------------------
# Annotations


@dataclasses.dataclass(frozen=True)
class Annotation:
  """Rater labels of one video before invalid markers: lagged and noisy."""
  va: np.ndarray    # [T, 2]
  expr: np.ndarray  # [T]
  au: np.ndarray    # [T, 12] 0/1


def annotate(affect: AffectTrack, rng: np.random.Generator, lag: int, fps: float,
             va_delay: int = 0) -> Annotation:
  """Labels as raters give them: the state `lag` frames earlier, plus rater noise.

  Valence and arousal are annotated continuously (a joystick moved while the video plays), so
  their raters react a further `va_delay` frames late: the VA label of frame t is the state of
  frame t - lag - va_delay. Expression and AU labels are given frame by frame and lag only `lag`.
  """
  n = affect.valence.shape[0]
  src = np.clip(np.arange(n) - lag, 0, n - 1)
  src_va = np.clip(np.arange(n) - lag - va_delay, 0, n - 1)
  noise = np.stack([0.05 * faces.smooth_noise(rng, n, fps * 0.3) + 0.015 * rng.standard_normal(n)
                    for _ in range(2)], 1)
  state = np.stack([affect.valence, affect.arousal], 1)
  seen = np.clip(state[src] + noise, -1, 1)      # what the expression rater sees
  va = np.clip(state[src_va] + noise, -1, 1)     # what the VA raters record
  expr = classify_expression(seen[:, 0], seen[:, 1], affect.flavour[src], affect.other[src])
  au_noise = 0.04 * np.stack([faces.smooth_noise(rng, n, fps * 0.2) for _ in AU_NAMES], 1)
  au = (affect.au_intensity[src] + au_noise > AU_THRESHOLD).astype(np.int32)
  flips = rng.uniform(size=au.shape) < 0.002
  au = np.where(flips, 1 - au, au)
  return Annotation(va=va, expr=expr, au=au)


# ----------------------------------------------------------------------------------------------
# Plan: which videos exist, where they go


@dataclasses.dataclass
class VideoPlan:
  video_id: str
  recording: int
  fps: float
  low_res: int
  num_frames: int            # annotation lines (every frame of the video)
  num_images: int            # frames 1..num_images may have an image; after that none
  missing: list[int]         # 1-based frames without an image (within 1..num_images)
  folder: str
  lag: int                   # frames every label lags the face
  va_delay: int              # further frames the VA labels lag (the raters' reaction delay)
  splits: dict               # task -> "Train_Set" / "Validation_Set" (labelled) ; {} for test videos
  test_sets: list            # tasks whose test list names this video
  line_style: dict           # task -> (crlf, final_newline, float format)


def _video_ids(rng, num_recordings):
  numbers = rng.choice(np.arange(1, 460), size=num_recordings, replace=False)
  out = []
  for n in numbers:
    fps = int(rng.choice([30, 30, 30, 25, 24, 60]))
    w, h = [(1280, 720), (1920, 1080), (640, 360), (640, 480), (854, 480), (1280, 720)][rng.integers(6)]
    vid = f"{n}-{fps}-{w}x{h}"
    if rng.uniform() < 0.3:
      vid += f"-{int(rng.integers(1, 9))}"
    out.append((vid, fps, h <= 480))
  return out


def plan_videos(seed: int, num_videos: int, frames_per_video: int, num_test_videos: int,
                validation_fraction: float = 0.3, va_delay_seconds: tuple = (0.0, 0.0)) -> list[VideoPlan]:
  """Decides ids, lengths, splits, tasks, folders, lags and missing frames for every subject video.

  Each video's VA reaction delay is drawn uniformly from `va_delay_seconds` (low, high) from a
  stream of its own, so the delay changes the VA labels and nothing else.
  """
  low, high = (float(x) for x in va_delay_seconds)
  if not 0 <= low <= high:
    raise ValueError(f"va_delay_seconds must be (low, high) with 0 <= low <= high, got {va_delay_seconds}")
  if num_videos < 2:
    raise ValueError(f"num_videos must be >= 2 (one train, one validation video), got {num_videos}")
  if frames_per_video < 30:
    raise ValueError(f"frames_per_video must be >= 30, got {frames_per_video}")
  if not 0 < validation_fraction < 1:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  rng = _rng(seed, _PLAN)
  delay_rng = _rng(seed, _VA_DELAY)
  # Subjects per recording: pairs (left/right) for about one recording in seven.
  labelled_recordings, remaining = [], num_videos
  while remaining > 0:
    size = 2 if remaining >= 3 and rng.uniform() < 0.15 else 1
    labelled_recordings.append(size)
    remaining -= size
  test_recordings = [1] * num_test_videos
  ids = _video_ids(rng, len(labelled_recordings) + len(test_recordings))

  # Split by recording: about validation_fraction of the subjects, at least one, never all.
  order = rng.permutation(len(labelled_recordings))
  val_recs, val_count = set(), 0
  for r in order:
    if val_count >= max(1, round(validation_fraction * num_videos)):
      break
    if val_count + labelled_recordings[r] >= num_videos:
      continue
    val_recs.add(int(r))
    val_count += labelled_recordings[r]

  task_sets = [("va", "expr", "au")] * 14 + [("va", "expr")] * 2 + [("va", "au")] * 2 + [("expr", "au")]
  plans = []
  for r, size in enumerate(labelled_recordings + test_recordings):
    vid, fps, low_res = ids[r]
    is_test = r >= len(labelled_recordings)
    num_frames = int(round(frames_per_video * rng.uniform(0.75, 1.25)))
    for s in range(size):
      video_id = vid if size == 1 else f"{vid}_{('left', 'right')[s]}"
      extra = int(rng.integers(1, 9)) if rng.uniform() < 0.33 else 0
      num_images = num_frames - extra
      missing = set()
      target = max(1, int(round(rng.uniform(0.01, 0.03) * num_images)))
      while len(missing) < target:
        start, run = int(rng.integers(2, num_images)), int(rng.integers(1, 5))
        missing.update(range(start, min(start + run, num_images, start + target - len(missing))))
      split = "Validation_Set" if r in val_recs else "Train_Set"
      tasks = task_sets[rng.integers(len(task_sets))]
      plans.append(VideoPlan(
          video_id=video_id, recording=r, fps=float(fps), low_res=int(rng.integers(72, 92)) if low_res else 0,
          num_frames=num_frames, num_images=num_images, missing=sorted(missing),
          folder=IMAGE_FOLDERS[int(rng.uniform() < 0.15)], lag=int(rng.integers(3, 9)),
          va_delay=int(round(fps * delay_rng.uniform(low, high))),
          splits={} if is_test else {t: split for t in tasks},
          test_sets=list(tasks) if is_test else [],
          line_style={t: (bool(rng.uniform() < 0.3), bool(rng.uniform() < 0.8), str(rng.choice(["%.3f", "%.4f", "%.6f"])))
                      for t in TASK_FOLDERS}))

  labelled = [p for p in plans if p.splits]
  split_of = {p.video_id: ("Validation_Set" if p.recording in val_recs else "Train_Set") for p in labelled}
  # Every task needs at least one train and one validation video.
  for task in TASK_FOLDERS:
    for split in SPLIT_FOLDERS:
      if not any(p.splits.get(task) == split for p in labelled):
        next(p for p in labelled if split_of[p.video_id] == split).splits[task] = split
  # The real release labels a few videos for one task in Train_Set and another in Validation_Set.
  if num_videos >= 8:
    movable = [p for p in labelled if split_of[p.video_id] == "Train_Set" and "expr" in p.splits
               and sum(q.splits.get("expr") == "Train_Set" for q in labelled) > 1]
    if movable:
      movable[0].splits["expr"] = "Validation_Set"
  if num_test_videos and not any("expr" in p.test_sets for p in plans):
    next(p for p in plans if not p.splits).test_sets.append("expr")
  for p in plans:
    if not p.splits:
      for task in TASK_FOLDERS:
        if task not in p.test_sets and rng.uniform() < 0.5:
          p.test_sets.append(task)
      p.test_sets = [t for t in TASK_FOLDERS if t in p.test_sets]
  return plans


# ----------------------------------------------------------------------------------------------
# Writers


def _write_lines(path, lines: Sequence[str], *, crlf=False, final_newline=True):
  sep = "\r\n" if crlf else "\n"
  text = sep.join(lines) + (sep if final_newline else "")
  with open(path, "w", newline="") as f:
    f.write(text)


def _write_npz(path, arrays: dict):
  """An .npz whose bytes depend only on the arrays (np.savez stamps the current time)."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for name, value in arrays.items():
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
      info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      zf.writestr(info, buf.getvalue())


def _annotation_lines(task, ann: Annotation, rng, fmt):
  n = ann.expr.shape[0]
  invalid = np.zeros(n, bool)
  if rng.uniform() < 0.35:
    run = max(1, int(n * rng.uniform(0.05, 0.15)))
    start = int(rng.integers(0, n - run + 1))
    invalid[start:start + run] = True
  lines = [TASK_HEADERS[task]]
  if task == "va":
    for (v, a), bad in zip(ann.va.tolist(), invalid):
      lines.append("-5,-5" if bad else f"{fmt % v},{fmt % a}")
  elif task == "expr":
    lines += ["-1" if bad else str(e) for e, bad in zip(ann.expr.tolist(), invalid)]
  else:
    single = rng.uniform(size=n) < 0.003
    for row, bad, one in zip(ann.au.tolist(), invalid, single):
      if bad:
        row = [-1] * len(AU_NAMES)
      elif one:
        row = list(row)
        row[int(rng.integers(len(AU_NAMES)))] = -1
      lines.append(",".join(str(x) for x in row))
  return lines


def _write_video(root, truth_dir, plan: VideoPlan, identity, scene, seed, index):
  rng = _rng(seed, _VIDEO, index)
  affect = simulate_affect(rng, plan.num_frames, plan.fps)
  track = face_track(affect, rng, plan.fps)
  image_dir = os.path.join(root, plan.folder, plan.video_id)
  os.makedirs(image_dir, exist_ok=True)
  has_image = np.zeros(plan.num_frames, bool)
  has_image[:plan.num_images] = True
  has_image[np.asarray(plan.missing, int) - 1] = False
  for k, img in enumerate(faces.render_faces(identity, scene, track), start=1):
    if k > plan.num_images:
      break
    if has_image[k - 1]:
      with open(os.path.join(image_dir, f"{k:05d}.jpg"), "wb") as f:
        f.write(faces.encode_jpeg(img, scene.jpeg_quality))

  ann = annotate(affect, rng, plan.lag, plan.fps, plan.va_delay)
  for task, split in plan.splits.items():
    d = os.path.join(root, ANNOTATION_ROOT, TASK_FOLDERS[task], split)
    os.makedirs(d, exist_ok=True)
    crlf, final_newline, fmt = plan.line_style[task]
    _write_lines(os.path.join(d, plan.video_id + ".txt"), _annotation_lines(task, ann, rng, fmt),
                 crlf=crlf, final_newline=final_newline)
  _write_npz(os.path.join(truth_dir, plan.video_id + ".npz"), {
      "valence": affect.valence.astype(np.float32), "arousal": affect.arousal.astype(np.float32),
      "expr": affect.expr, "au_intensity": affect.au_intensity.astype(np.float32), "au": affect.au,
      "has_image": has_image, "lag_frames": np.int32(plan.lag), "va_delay_frames": np.int32(plan.va_delay),
      "annotated_va": ann.va.astype(np.float32), "annotated_expr": ann.expr, "annotated_au": ann.au})
  return affect


# ----------------------------------------------------------------------------------------------
# Face image datasets


def _state_pool(seed, num_sequences=24, length=1500):
  """Affect states to draw static faces from, indexed by class."""
  rng = _rng(seed, _POOL)
  tracks = [simulate_affect(rng, length, 30.0) for _ in range(num_sequences)]
  cat = lambda f: np.concatenate([getattr(t, f) for t in tracks])
  pool = AffectTrack(**{f.name: cat(f.name) for f in dataclasses.fields(AffectTrack)})
  pool = dataclasses.replace(pool, blink=np.zeros_like(pool.blink))  # photos are taken with eyes open
  by_class = {c: np.flatnonzero(pool.expr == i) for i, c in enumerate(EXPR_CLASSES)}
  empty = [c for c, frames in by_class.items() if frames.size == 0]
  if empty:
    raise RuntimeError(f"the state pool for seed {seed} has no frame of class {empty}; enlarge it")
  return pool, by_class


def _static_faces(rng, pool, by_class, classes: Sequence[str], scenes):
  """Renders one fresh identity per requested class; returns (images, states index array)."""
  idx = np.array([rng.choice(by_class[c]) for c in classes], int)
  images = []
  for i in idx:
    one = AffectTrack(**{f.name: getattr(pool, f.name)[i:i + 1] for f in dataclasses.fields(AffectTrack)})
    identity = faces.sample_identity(rng)
    scene = scenes[int(rng.integers(len(scenes)))]
    track = face_track(one, rng, 30.0, static=True)
    images.append((next(faces.render_faces(identity, scene, track)), identity, track))
  return images, idx


def _draw_classes(rng, count, proportions: dict):
  """`count` class names in random order, in about the given proportions, each at least once."""
  names = list(proportions)
  p = np.array([proportions[n] for n in names], float)
  counts = np.maximum(1, np.floor(p / p.sum() * count)).astype(int)
  by_size = np.argsort(-p, kind="stable")
  k = 0
  while counts.sum() != count:
    counts[by_size[k % len(names)]] += 1 if counts.sum() < count else -1
    k += 1
  out = [n for n, c in zip(names, counts) for _ in range(c)]
  return [out[i] for i in rng.permutation(len(out))]


def _write_affectnet(out, seed, count, pool, by_class, scenes):
  rng = _rng(seed, _AFFECTNET)
  proportions = {"Neutral": 0.22, "Happiness": 0.30, "Sadness": 0.08, "Surprise": 0.07, "Fear": 0.05,
                 "Disgust": 0.04, "Anger": 0.07, "Other": 0.04, "None": 0.06, "Uncertain": 0.03, "Non-face": 0.04}
  wanted = _draw_classes(rng, count, proportions)
  render_as = [w if w in by_class else ("Neutral" if w == "Non-face" else str(rng.choice(["Neutral", "Other", "Happiness"])))
               for w in wanted]
  rendered, idx = _static_faces(rng, pool, by_class, render_as, scenes)
  root = os.path.join(out, AFFECTNET_DIR)
  rows = {"training.csv": [], "validation.csv": []}
  for n, (label, (img, identity, track), i) in enumerate(zip(wanted, rendered, idx)):
    sub = str(int(rng.integers(1, 40)))
    name = rng.bytes(28).hex() + ".jpg"
    w, h = int(rng.integers(150, 260)), int(rng.integers(150, 260))
    size = int(rng.integers(96, min(w, h) - 10))
    x, y = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
    scene = scenes[int(rng.integers(len(scenes)))]
    canvas = scene.background.resize((w, h), Image.BILINEAR)
    if label != "Non-face":
      canvas.paste(img.resize((size, size), Image.BILINEAR), (x, y))
    os.makedirs(os.path.join(root, "Manually_Annotated_Images", sub), exist_ok=True)
    canvas.save(os.path.join(root, "Manually_Annotated_Images", sub, name), format="JPEG", quality=92)
    marks = faces.face_landmarks(identity, track)[0] * (size / faces.FACE_SIZE) + [x, y]
    code = {"None": 8, "Uncertain": 9, "Non-face": 10}.get(label, AFFECTNET_CODES.get(label))
    if label == "Non-face":
      v = a = -2.0
    else:
      v = float(np.clip(pool.valence[i] + rng.normal(0, 0.05), -1, 1))
      a = float(np.clip(pool.arousal[i] + rng.normal(0, 0.05), -1, 1))
    split = "validation.csv" if rng.uniform() < 0.15 else "training.csv"
    rows[split].append([f"{sub}/{name}", x, y, size, size, ";".join(f"{c:.2f}" for c in marks.ravel()),
                        code, f"{v:.6f}" if code < 10 else "-2", f"{a:.6f}" if code < 10 else "-2"])
  for fname, body in rows.items():
    with open(os.path.join(root, fname), "w", newline="") as f:
      writer = csv.writer(f, lineterminator="\n")
      writer.writerow(AFFECTNET_COLUMNS)
      writer.writerows(body)
  return {k: len(v) for k, v in rows.items()}


def _write_rafdb(out, seed, count, pool, by_class, scenes):
  rng = _rng(seed, _RAFDB)
  proportions = {"Surprise": 0.10, "Fear": 0.03, "Disgust": 0.06, "Happiness": 0.39, "Sadness": 0.16,
                 "Anger": 0.06, "Neutral": 0.20}
  wanted = _draw_classes(rng, count, proportions)
  rendered, _ = _static_faces(rng, pool, by_class, wanted, scenes)
  root = os.path.join(out, RAFDB_DIR)
  os.makedirs(os.path.join(root, "EmoLabel"), exist_ok=True)
  os.makedirs(os.path.join(root, "Image", "aligned"), exist_ok=True)
  num_test = max(1, int(round(0.2 * count)))
  lines, n_train, n_test = [], 0, 0
  for k, (label, (img, _, _)) in enumerate(zip(wanted, rendered)):
    if k < count - num_test:
      n_train += 1
      name = f"train_{n_train:05d}"
    else:
      n_test += 1
      name = f"test_{n_test:04d}"
    img.resize((100, 100), Image.BILINEAR).save(os.path.join(root, "Image", "aligned", f"{name}_aligned.jpg"),
                                                format="JPEG", quality=92)
    lines.append(f"{name}.jpg {RAFDB_CODES[label]}")
  _write_lines(os.path.join(root, "EmoLabel", "list_patition_label.txt"), lines)
  return {"train": n_train, "test": n_test}


def _ferplus_votes(rng, label):
  """Ten taggers' votes: 5-10 for the true class, the rest mostly neutral (sadness for neutral
  faces) or any other column; a non-face (label None) gets all ten as NF."""
  votes = dict.fromkeys(FERPLUS_COLUMNS, 0)
  if label is None:
    votes["NF"] = 10
    return votes
  true = FERPLUS_OF_CLASS[label]
  votes[true] = int(rng.integers(5, 11))
  near = "sadness" if true == "neutral" else "neutral"
  others = [c for c in FERPLUS_COLUMNS[:9] if c != true]
  for _ in range(10 - votes[true]):
    votes[near if rng.uniform() < 0.4 else others[int(rng.integers(len(others)))]] += 1
  return votes


def _write_fer(out, seed, count, pool, by_class, scenes):
  rng = _rng(seed, _FER)
  proportions = {"Anger": 0.14, "Disgust": 0.015, "Fear": 0.14, "Happiness": 0.25, "Sadness": 0.17,
                 "Surprise": 0.11, "Neutral": 0.175}
  wanted = _draw_classes(rng, count, proportions)
  rendered, _ = _static_faces(rng, pool, by_class, wanted, scenes)
  nonface = set(rng.choice(count, size=max(1, count // 100), replace=False).tolist())
  usage = ["Training"] * (count - 2 * (count // 10)) + ["PublicTest"] * (count // 10) + ["PrivateTest"] * (count // 10)
  for d in (FER2013_DIR, FERPLUS_DIR):
    os.makedirs(os.path.join(out, d), exist_ok=True)
  fer_rows, plus_rows = [], []
  fer_classes = list(FER2013_CODES)
  for k, (label, (img, _, _)) in enumerate(zip(wanted, rendered)):
    if k in nonface:
      grey = np.full((48, 48), int(rng.integers(0, 256)), np.uint8)
      true = None
    else:
      grey = np.asarray(img.crop((10, 12, 102, 104)).convert("L").resize((48, 48), Image.BILINEAR))
      true = label
    # FER2013's own labels are noisy (FER+ relabelled it for that reason).
    noisy = label if rng.uniform() > 0.1 else fer_classes[int(rng.integers(len(fer_classes)))]
    fer_rows.append([FER2013_CODES[noisy], " ".join(map(str, grey.ravel().tolist())), usage[k]])
    votes = _ferplus_votes(rng, true)
    plus_rows.append([usage[k], "" if true is None else f"fer{k:07d}.png"] + [votes[c] for c in FERPLUS_COLUMNS])
  for path, header, body in ((os.path.join(out, FER2013_DIR, "fer2013.csv"), ("emotion", "pixels", "Usage"), fer_rows),
                             (os.path.join(out, FERPLUS_DIR, "fer2013new.csv"), ("Usage", "Image name") + FERPLUS_COLUMNS,
                              plus_rows)):
    with open(path, "w", newline="") as f:
      writer = csv.writer(f, lineterminator="\n")
      writer.writerow(header)
      writer.writerows(body)
  return {"rows": count, "non_face": len(nonface)}


# ----------------------------------------------------------------------------------------------
# Entry points


def summary_path(out_dir: str) -> str:
  """Where `generate(out_dir, ...)` writes its summary (the mark of a finished generation)."""
  return os.path.join(out_dir, TRUTH_DIR, "summary.json")


def generation_settings(**kwargs) -> dict:
  """The arguments of `generate` as its summary records them (JSON types)."""
  return {k: [float(x) for x in v] if isinstance(v, (tuple, list)) else v for k, v in sorted(kwargs.items())}


def generate(out_dir: str, *, num_videos: int = 24, frames_per_video: int = 600, seed: int = 0,
             num_test_videos: int = 3, validation_fraction: float = 0.3, affectnet_images: int = 400,
             rafdb_images: int = 300, fer2013_images: int = 300,
             va_delay_seconds: tuple = (0.0, 0.0)) -> dict:
  """Writes the synthetic Aff-Wild2 tree and the face datasets under `out_dir`; returns the summary.

  `num_videos` labelled subject videos (about `validation_fraction` of them in Validation_Set, split
  by recording) plus `num_test_videos` unlabelled test videos, each about `frames_per_video` frames
  long (uniformly 0.75-1.25 times that). A face dataset with a count of 0 is not written. The
  summary (also in `_synthetic_truth/summary.json`) names the dataset roots and, per video, its
  splits per task, image folder, frame and image counts, missing frames and label lag, and the
  arguments it was made with (`settings`). `va_delay_seconds` (low, high): the VA raters' extra
  reaction delay per video, uniform in that range (default none).
  """
  for name, value in (("num_test_videos", num_test_videos), ("affectnet_images", affectnet_images),
                      ("rafdb_images", rafdb_images), ("fer2013_images", fer2013_images)):
    if value < 0:
      raise ValueError(f"{name} must be >= 0, got {value}")
  if any(0 < c < 10 for c in (affectnet_images, rafdb_images, fer2013_images)):
    raise ValueError("face dataset image counts must be 0 or >= 10")
  plans = plan_videos(seed, num_videos, frames_per_video, num_test_videos, validation_fraction, va_delay_seconds)
  root = os.path.join(out_dir, AFFWILD2_DIR)
  truth_dir = os.path.join(out_dir, TRUTH_DIR)
  os.makedirs(truth_dir, exist_ok=True)
  for folder in IMAGE_FOLDERS:
    os.makedirs(os.path.join(root, folder), exist_ok=True)

  scenes, expr_counts = {}, np.zeros(len(EXPR_CLASSES), int)
  for index, plan in enumerate(plans):
    if plan.recording not in scenes:
      scenes[plan.recording] = faces.sample_scene(_rng(seed, _SCENE, plan.recording), low_res=plan.low_res)
    identity = faces.sample_identity(_rng(seed, _SCENE, 10_000 + index))
    affect = _write_video(root, truth_dir, plan, identity, scenes[plan.recording], seed, index)
    expr_counts += np.bincount(affect.expr, minlength=len(EXPR_CLASSES))

  if num_test_videos:
    test_dir = os.path.join(root, TEST_LIST_DIR)
    os.makedirs(test_dir, exist_ok=True)
    for task, fname in TEST_LISTS.items():
      _write_lines(os.path.join(test_dir, fname), [p.video_id for p in plans if task in p.test_sets])

  roots = {"aff_wild2": root}
  counts = {}
  if affectnet_images or rafdb_images or fer2013_images:
    pool, by_class = _state_pool(seed)
    static_scenes = [faces.sample_scene(_rng(seed, _SCENE, 20_000 + k), low_res=(0, 0, 84)[k % 3]) for k in range(12)]
    if affectnet_images:
      counts["affectnet"] = _write_affectnet(out_dir, seed, affectnet_images, pool, by_class, static_scenes)
      roots["affectnet"] = os.path.join(out_dir, AFFECTNET_DIR)
    if rafdb_images:
      counts["raf_db"] = _write_rafdb(out_dir, seed, rafdb_images, pool, by_class, static_scenes)
      roots["raf_db"] = os.path.join(out_dir, RAFDB_DIR)
    if fer2013_images:
      counts["fer2013"] = _write_fer(out_dir, seed, fer2013_images, pool, by_class, static_scenes)
      roots["fer2013"] = os.path.join(out_dir, FER2013_DIR)
      roots["ferplus"] = os.path.join(out_dir, FERPLUS_DIR)

  summary = {
      "seed": seed,
      "settings": generation_settings(num_videos=num_videos, frames_per_video=frames_per_video, seed=seed,
                                      num_test_videos=num_test_videos, validation_fraction=validation_fraction,
                                      affectnet_images=affectnet_images, rafdb_images=rafdb_images,
                                      fer2013_images=fer2013_images, va_delay_seconds=va_delay_seconds),
      "roots": {k: os.path.relpath(v, out_dir) for k, v in roots.items()},
      "videos": [{
          "video_id": p.video_id, "splits": p.splits, "test_sets": p.test_sets, "folder": p.folder,
          "num_frames": p.num_frames, "num_images": p.num_images, "missing_frames": p.missing,
          "lag_frames": p.lag, "va_delay_frames": p.va_delay, "fps": p.fps, "recording": p.recording} for p in plans],
      "expr_frame_counts": dict(zip(EXPR_CLASSES, expr_counts.tolist())),
      "face_datasets": counts,
  }
  with open(summary_path(out_dir), "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  return summary


def _main(argv):
  from absl import flags
  del argv
  f = flags.FLAGS
  summary = generate(f.out, num_videos=f.videos, frames_per_video=f.frames, seed=f.seed,
                     num_test_videos=f.test_videos, affectnet_images=f.affectnet_images,
                     rafdb_images=f.rafdb_images, fer2013_images=f.fer2013_images,
                     va_delay_seconds=tuple(float(x) for x in f.va_delay_seconds))
  frames = sum(v["num_frames"] for v in summary["videos"])
  print(f"wrote {len(summary['videos'])} videos ({frames} frames) and {summary['face_datasets']} under {f.out}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("out", None, "Output directory.", required=True)
  flags.DEFINE_integer("videos", 24, "Labelled videos (train + validation).")
  flags.DEFINE_integer("frames", 600, "Mean frames per video (each is 0.75-1.25x this).")
  flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same bytes.")
  flags.DEFINE_integer("test_videos", 3, "Unlabelled test videos.")
  flags.DEFINE_integer("affectnet_images", 400, "AffectNet-style images (0 = skip).")
  flags.DEFINE_integer("rafdb_images", 300, "RAF-DB-style images (0 = skip).")
  flags.DEFINE_integer("fer2013_images", 300, "FER2013/FER+ rows (0 = skip).")
  flags.DEFINE_list("va_delay_seconds", ["0", "0"], "low,high: VA raters' extra reaction delay per video.")
  app.run(_main)
