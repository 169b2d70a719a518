"""Procedural face renderer for the synthetic dataset (see `affect_jax.data.synthetic`).

A face is a fixed set of Pillow polygons and lines whose geometry is a function of an
`Identity` (shape, colours, hair), a `Scene` (background, lighting, noise, JPEG quality) and a
per-frame `FaceTrack` (the 12 AU intensities, valence, arousal, blinks, a one-sided lip pull,
gaze, head pose).
Geometry for a whole video is computed at once with numpy ([frames, points, 2] arrays, one affine
pose transform per frame); the per-frame loop only hands ready-made point lists to ImageDraw.
Faces are drawn at twice the output size and box-filtered down, which anti-aliases the edges so
that sub-pixel changes of expression remain visible to a model.

Coordinates below are in the 112x112 output frame (x right, y down), laid out roughly like an
ArcFace-aligned crop: eyes near y=47, mouth near y=82.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from affect_jax.data.schema import AU_NAMES

FACE_SIZE = 112
SUPERSAMPLE = 2
_AU = {name: i for i, name in enumerate(AU_NAMES)}

_SKIN_LIGHT = np.array([238.0, 204.0, 180.0])
_SKIN_DARK = np.array([104.0, 70.0, 50.0])
_HAIR_COLOURS = np.array([
    [25, 20, 18], [55, 38, 28], [95, 65, 40], [150, 110, 60], [200, 170, 110],
    [130, 60, 30], [160, 160, 160], [80, 80, 85],
], dtype=np.float64)
_IRIS_COLOURS = np.array([[70, 45, 25], [45, 30, 20], [60, 100, 140], [80, 110, 70], [100, 80, 50]],
                         dtype=np.float64)


def smooth_noise(rng: np.random.Generator, num_frames: int, timescale: float) -> np.ndarray:
  """Stationary Gaussian noise with unit variance, smoothed over `timescale` frames (kernel sd).

  White noise is drawn beyond both ends, so the first and last frames are as smooth as the
  middle; the kernel has unit L2 norm, so each value has variance exactly 1.
  """
  sigma = max(float(timescale), 0.5)
  half = int(math.ceil(3.0 * sigma))
  kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
  kernel /= np.sqrt(np.sum(kernel ** 2))
  white = rng.standard_normal(num_frames + 2 * half)
  smooth = np.convolve(white, kernel, mode="valid")
  return smooth[:num_frames]


# ----------------------------------------------------------------------------------------------
# Identity and scene


@dataclasses.dataclass(frozen=True)
class Identity:
  """Everything that makes one synthetic person look different from another."""
  skin: tuple[int, int, int]
  hair: tuple[int, int, int]
  hair_style: int           # 0 short, 1 long (hair behind the head), 2 fringe, 3 receding
  brow: tuple[int, int, int]
  iris: tuple[int, int, int]
  lips: tuple[int, int, int]
  clothes: tuple[int, int, int]
  glasses: bool
  head_cx: float
  head_cy: float
  head_hw: float            # half width
  head_top: float           # centre to crown
  head_chin: float          # centre to chin
  jaw_taper: float
  hairline: float           # y of the hairline
  eye_y: float
  eye_dx: float             # half the distance between the eye centres
  eye_hw: float
  eye_up: float             # upper lid height at rest
  eye_lo: float             # lower lid depth at rest
  eye_tilt: float
  brow_gap: float           # brow above eye centre
  brow_len: float
  brow_th: float
  nose_y: float
  nose_w: float
  mouth_y: float
  mouth_hw: float
  lip_up: float
  lip_lo: float


def _blend(a, b, t):
  return tuple(int(round(x)) for x in np.clip((1.0 - t) * np.asarray(a, float) + t * np.asarray(b, float), 0, 255))


def sample_identity(rng: np.random.Generator) -> Identity:
  """Draws one person: face shape, proportions and colours."""
  tone = rng.beta(1.1, 2.0)
  skin = np.clip(_SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone + rng.normal(0, 6, 3), 0, 255)
  hair = np.clip(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.normal(0, 8, 3), 0, 255)
  head_cy = 60.0 + rng.normal(0, 1.2)
  head_top = rng.uniform(47, 54)
  return Identity(
      skin=_blend(skin, skin, 0.0),  # as an RGB tuple
      hair=_blend(hair, hair, 0.0),
      hair_style=int(rng.integers(4)),
      brow=_blend(hair, (20, 15, 10), rng.uniform(0.3, 0.7)),
      iris=_blend(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))], (0, 0, 0), rng.uniform(0, 0.3)),
      lips=_blend(skin, (170, 60, 70), rng.uniform(0.3, 0.55)),
      clothes=tuple(int(c) for c in rng.integers(20, 235, 3)),
      glasses=bool(rng.uniform() < 0.1),
      head_cx=56.0 + rng.normal(0, 1.0),
      head_cy=head_cy,
      head_hw=rng.uniform(35, 41),
      head_top=head_top,
      head_chin=rng.uniform(45, 51),
      jaw_taper=rng.uniform(0.12, 0.32),
      hairline=head_cy - head_top + rng.uniform(11, 19),
      eye_y=head_cy - rng.uniform(11, 14.5),
      eye_dx=rng.uniform(16, 19),
      eye_hw=rng.uniform(7.5, 8.8),
      eye_up=rng.uniform(4.3, 4.9),
      eye_lo=rng.uniform(2.5, 3.0),
      eye_tilt=rng.uniform(-0.8, 1.5),
      brow_gap=rng.uniform(7.5, 9.5),
      brow_len=rng.uniform(13, 16.5),
      brow_th=rng.uniform(2.3, 3.6),
      nose_y=head_cy + rng.uniform(7, 10),
      nose_w=rng.uniform(5, 7),
      mouth_y=head_cy + rng.uniform(20.5, 24),
      mouth_hw=rng.uniform(12, 14.5),
      lip_up=rng.uniform(2.5, 3.6),
      lip_lo=rng.uniform(3.2, 4.5),
  )


@dataclasses.dataclass(frozen=True)
class Scene:
  """Camera and surroundings of one recording (shared by the `_left`/`_right` subjects)."""
  background: Image.Image          # RGB, supersampled size
  lighting: Image.Image            # RGB multiplier (255 = 1.0), output size
  noise: tuple[tuple[Image.Image, Image.Image], ...]  # (add, subtract) pairs, output size
  jpeg_quality: int
  low_res: int                     # 0, or the size the face is squeezed through (camera blur)


def sample_scene(rng: np.random.Generator, *, low_res: int = 0) -> Scene:
  """Draws a background, a lighting gradient, sensor noise and a JPEG quality."""
  big = FACE_SIZE * SUPERSAMPLE
  yy, xx = np.mgrid[0:big, 0:big] / big - 0.5
  base = rng.uniform(40, 210, 3)
  grad_dir = rng.uniform(0, 2 * np.pi)
  grad = (xx * np.cos(grad_dir) + yy * np.sin(grad_dir))[..., None] * rng.uniform(-60, 60, 3)
  bg = np.broadcast_to(base, (big, big, 3)) + grad
  for _ in range(3):
    cx, cy = rng.uniform(-0.5, 0.5, 2)
    r = rng.uniform(0.1, 0.35)
    mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
    bg = np.where(mask[..., None], bg + rng.uniform(-50, 50, 3), bg)
  background = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(4))

  yy, xx = np.mgrid[0:FACE_SIZE, 0:FACE_SIZE] / FACE_SIZE - 0.5
  light_dir = rng.uniform(0, 2 * np.pi)
  strength = rng.uniform(0.05, 0.25)
  along = xx * np.cos(light_dir) + yy * np.sin(light_dir)
  tint = rng.uniform(0.93, 1.0, 3)
  light = (1.0 - strength * (0.5 + along))[..., None] * tint
  lighting = Image.fromarray(np.clip(light * 255, 0, 255).astype(np.uint8))

  noise_sd = rng.uniform(1.0, 4.0)
  noise = []
  for _ in range(4):
    n = rng.normal(0, noise_sd, (FACE_SIZE, FACE_SIZE, 1)).repeat(3, axis=2)
    noise.append((Image.fromarray(np.clip(n, 0, 255).astype(np.uint8)),
                  Image.fromarray(np.clip(-n, 0, 255).astype(np.uint8))))
  return Scene(background=background, lighting=lighting, noise=tuple(noise),
               jpeg_quality=int(rng.integers(84, 96)), low_res=int(low_res))


# ----------------------------------------------------------------------------------------------
# Per-frame drivers


@dataclasses.dataclass(frozen=True)
class FaceTrack:
  """What moves in a face, one row per frame (all arrays have leading length T)."""
  au: np.ndarray        # [T, 12] intensities in [0, 1], AU_NAMES order
  valence: np.ndarray   # [T] in [-1, 1]
  arousal: np.ndarray   # [T] in [-1, 1]
  blink: np.ndarray     # [T] lid closure in [0, 1]
  smirk: np.ndarray     # [T] one-sided lip-corner pull in [0, 1] (contempt-like, "Other")
  gaze: np.ndarray      # [T, 2] iris offset, pixels
  roll: np.ndarray      # [T] degrees
  yaw: np.ndarray       # [T] in about [-1, 1]; shifts features sideways by depth
  shift: np.ndarray     # [T, 2] pixels
  scale: np.ndarray     # [T] relative

  def __len__(self):
    return self.au.shape[0]


def sample_pose(rng: np.random.Generator, num_frames: int, fps: float, *, amount: float = 1.0):
  """Smooth small head motion: (roll, yaw, shift, scale, gaze) arrays for `FaceTrack`."""
  ts = fps * rng.uniform(0.6, 2.0)
  roll = amount * rng.uniform(2.0, 5.0) * smooth_noise(rng, num_frames, ts) + rng.normal(0, 2)
  yaw = np.clip(amount * 0.3 * smooth_noise(rng, num_frames, ts) + rng.normal(0, 0.15), -0.8, 0.8)
  shift = amount * 1.8 * np.stack([smooth_noise(rng, num_frames, ts), smooth_noise(rng, num_frames, ts)], 1)
  scale = 1.0 + amount * 0.03 * smooth_noise(rng, num_frames, ts) + rng.normal(0, 0.02)
  gaze = 1.2 * np.stack([smooth_noise(rng, num_frames, fps * 0.5), 0.4 * smooth_noise(rng, num_frames, fps * 0.5)], 1)
  return roll, yaw, shift, scale, gaze


# ----------------------------------------------------------------------------------------------
# Geometry


def _ellipse(cx, cy, rx, ry, n=20):
  """[T, n, 2] points of axis-aligned ellipses; arguments broadcast over T."""
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  cx, cy, rx, ry = (np.asarray(v, float).reshape(-1, 1) for v in (cx, cy, rx, ry))
  x, y = np.broadcast_arrays(cx + rx * np.cos(t), cy + ry * np.sin(t))
  return np.stack([x, y], axis=-1)


def _face_parts(idn: Identity, tr: FaceTrack):
  """All shapes of the face, back to front, as (kind, points[T,P,2], colour(s), width, depth, name).

  `colour` is one RGB tuple or a list of them, one per frame; `depth` scales the sideways shift
  under yaw (0 at the head outline, 1 at the nose tip); `name` marks parts used for landmarks.
  """
  n = len(tr)
  au = {name: tr.au[:, i] for name, i in _AU.items()}
  v, a = tr.valence, tr.arousal
  cx = idn.head_cx
  parts = []

  def add(kind, pts, colour, width=0, depth=0.0, name=""):
    parts.append((kind, np.asarray(pts, float), colour, width, depth, name))

  # Lips part visibly only once AU25 passes its low resting level; the jaw drop lowers the chin too.
  opening = 6.0 * np.clip(au["AU25"] - 0.15, 0, 1) + 10.0 * au["AU26"]
  chin_drop = 0.45 * opening

  # Clothes and neck.
  neck_w = idn.head_hw * 0.55
  add("polygon", np.array([[cx - 60, 125], [cx - 45, 100], [cx + 45, 100], [cx + 60, 125]]), idn.clothes)
  add("polygon", np.array([[cx - neck_w, idn.head_cy + 25], [cx + neck_w, idn.head_cy + 25],
                           [cx + neck_w * 1.05, 114], [cx - neck_w * 1.05, 114]]),
      _blend(idn.skin, (0, 0, 0), 0.25))

  # Long hair behind the head.
  if idn.hair_style == 1:
    t = np.linspace(np.pi * 1.02, np.pi * 1.98, 14)
    top = np.stack([cx + (idn.head_hw + 5) * np.cos(t), idn.head_cy + (idn.head_top + 4) * np.sin(t)], -1)
    pts = np.concatenate([[[cx - idn.head_hw - 6, idn.head_cy + 34]], top, [[cx + idn.head_hw + 6, idn.head_cy + 34]]])
    add("polygon", pts, idn.hair)

  # Ears.
  ear_y = (idn.eye_y + idn.nose_y) / 2
  for side in (-1, 1):
    add("polygon", _ellipse(cx + side * (idn.head_hw + 0.5), ear_y, 4.0, 8.0, 12)[0],
        _blend(idn.skin, (120, 60, 50), 0.12), depth=-0.6)

  # Head: upper half ellipse, lower half narrowing to the chin.
  t = np.linspace(0, 2 * np.pi, 36, endpoint=False)
  lower = np.sin(t) > 0
  hx = idn.head_hw * np.cos(t) * np.where(lower, 1 - idn.jaw_taper * np.sin(t) ** 2, 1.0)
  hy = np.where(lower, idn.head_chin, idn.head_top) * np.sin(t)
  head = np.stack([np.broadcast_to(cx + hx, (n, t.size)),
                   idn.head_cy + hy + chin_drop[:, None] * np.where(lower, np.sin(t) ** 4, 0.0)], -1)
  add("polygon", head, idn.skin, name="head")

  # Cheek blush rises with AU6.
  cheek = np.clip(0.1 + 0.9 * au["AU6"], 0, 1)
  cheek_colours = [_blend(idn.skin, (215, 95, 95), 0.55 * c) for c in cheek]
  for side in (-1, 1):
    add("polygon", _ellipse(cx + side * (idn.eye_dx + 2), idn.eye_y + 14 - 3.5 * au["AU6"], 7.0, 5.0, 14),
        cheek_colours, depth=0.4)

  # Forehead wrinkles (AU1/AU2) and glabella lines (AU4).
  brow_raise = np.clip((au["AU1"] + au["AU2"]) / 2, 0, 1)
  fw_colours = [_blend(idn.skin, (0, 0, 0), 0.35 * max(0.0, c - 0.25) / 0.75) for c in brow_raise]
  for k in range(2):
    y = idn.eye_y - idn.brow_gap - 7 - 4 * k
    u = np.linspace(-1, 1, 7)
    add("line", np.stack([cx + 12 * u, y - 1.2 * (1 - u ** 2)], -1), fw_colours, width=2, depth=0.3)
  gl_colours = [_blend(idn.skin, (0, 0, 0), 0.4 * max(0.0, c - 0.2) / 0.8) for c in au["AU4"]]
  for side in (-1, 1):
    add("line", np.array([[cx + side * 2.0, idn.eye_y - idn.brow_gap + 1], [cx + side * 2.6, idn.eye_y - idn.brow_gap - 5]]),
        gl_colours, width=2, depth=0.4)

  # Hair on top: the crown follows the skull down to the temples, then the hairline closes it.
  temple_y = idn.eye_y - 7.0
  rim_x, rim_y = idn.head_hw + 2.0, idn.head_top + 3.0
  s_t = (temple_y - idn.head_cy) / rim_y
  t = np.linspace(np.pi - np.arcsin(s_t), 2 * np.pi + np.arcsin(s_t), 17)
  crown = np.stack([cx + rim_x * np.cos(t), idn.head_cy + rim_y * np.sin(t)], -1)
  u = np.linspace(1, -1, 13)
  sharpness, centre_y = {0: (2.5, idn.hairline), 1: (2.0, idn.hairline), 2: (5.0, idn.hairline + 5.0),
                         3: (1.4, idn.hairline - 4.0)}[idn.hair_style]
  line_y = centre_y + (temple_y - centre_y) * np.abs(u) ** sharpness
  if idn.hair_style == 3:  # receding corners
    line_y = line_y - 4.0 * np.exp(-((np.abs(u) - 0.55) / 0.15) ** 2)
  hairline = np.stack([cx + u * rim_x * np.cos(np.arcsin(s_t)), line_y], -1)
  add("polygon", np.concatenate([crown, hairline]), idn.hair)

  # Nasolabial folds deepen with AU12, AU10 and AU6.
  fold = np.clip(0.1 + 0.5 * au["AU12"] + 0.5 * au["AU10"] + 0.3 * au["AU6"], 0, 1)
  fold_colours = [_blend(idn.skin, (0, 0, 0), 0.35 * f) for f in fold]

  # Mouth geometry first (the folds end at the corners).
  mw = idn.mouth_hw * (1 + 0.25 * au["AU12"] + 0.06 * au["AU25"] - 0.18 * au["AU23"] - 0.1 * au["AU24"]
                       - 0.05 * au["AU15"] + 0.08 * au["AU10"])
  corner = idn.mouth_hw * (-0.42 * au["AU12"] + 0.35 * au["AU15"] - 0.15 * v + 0.04 * au["AU24"])
  asym = -idn.mouth_hw * 0.28 * tr.smirk
  u = np.linspace(-1, 1, 13)
  bulge = np.sqrt(np.clip(1 - u ** 2, 0, 1))[None]
  mid = idn.mouth_y + corner[:, None] * u[None] ** 2 + asym[:, None] * np.clip(u, 0, 1)[None] ** 2
  mid = mid - 1.2 * au["AU10"][:, None] * (1 - u[None] ** 2)
  mx = cx + mw[:, None] * u[None]
  o = opening[:, None] * (1 - u[None] ** 2) ** 0.8
  inner_up = mid - 0.3 * o - 1.5 * au["AU10"][:, None] * (1 - u[None] ** 2)
  inner_lo = mid + 0.7 * o
  thin = np.clip(1 - 0.65 * au["AU24"] - 0.45 * au["AU23"], 0.25, 1)[:, None]
  bow = 1 - 0.35 * np.exp(-(u / 0.18) ** 2)[None]
  outer_up = inner_up - idn.lip_up * thin * bulge * bow - 0.3
  outer_lo = inner_lo + idn.lip_lo * thin * bulge + 0.3
  lips = np.concatenate([np.stack([mx, outer_up], -1), np.stack([mx[:, ::-1], outer_lo[:, ::-1]], -1)], 1)
  mouth_in = np.concatenate([np.stack([mx, inner_up], -1), np.stack([mx[:, ::-1], inner_lo[:, ::-1]], -1)], 1)
  teeth_lo = np.minimum(inner_up + 3.0, inner_lo)
  inner_u = (np.abs(u) < 0.75)
  teeth = np.concatenate([np.stack([mx[:, inner_u], inner_up[:, inner_u]], -1),
                          np.stack([mx[:, inner_u][:, ::-1], teeth_lo[:, inner_u][:, ::-1]], -1)], 1)

  for side, idx in ((-1, 0), (1, -1)):
    start = np.stack([np.full(n, cx + side * idn.nose_w * 1.1), np.full(n, idn.nose_y - 1.0)], -1)
    end = np.stack([mx[:, idx] + side * 2.0, mid[:, idx] + 1.0], -1)
    ctrl = (start + end) / 2 + np.array([side * 2.5, 0.0])
    add("line", np.stack([start, ctrl, end], 1), fold_colours, width=2, depth=0.5)

  # Eyes: whites clipped by lids, iris and pupil clipped to the opening, dark upper lid line.
  openness = np.clip(0.62 + 0.55 * a + 0.25 * np.maximum(au["AU1"], au["AU2"]) - 0.4 * au["AU7"]
                     - 0.28 * au["AU6"] - 0.15 * au["AU4"], 0.08, 1.45) * (1 - 0.95 * tr.blink)
  lower_lid = np.clip(1 - 0.45 * au["AU7"] - 0.45 * au["AU6"], 0.3, 1.1)
  eu = np.linspace(-1, 1, 11)
  white = _blend((245, 245, 240), idn.skin, 0.15)
  for side in (-1, 1):
    ex = cx + side * idn.eye_dx
    tilt = -0.5 * idn.eye_tilt * side * eu[None]
    up_h = (idn.eye_up * openness)[:, None]
    lo_h = (idn.eye_lo * lower_lid)[:, None]
    shape = (1 - eu[None] ** 2) ** 0.75
    up = idn.eye_y - up_h * shape + tilt
    lo = idn.eye_y + lo_h * shape + tilt
    xs = np.broadcast_to(ex + idn.eye_hw * eu, (n, eu.size))
    add("polygon", np.concatenate([np.stack([xs, up], -1), np.stack([xs[:, ::-1], lo[:, ::-1]], -1)], 1), white,
        depth=0.5, name=f"eye{side}")

    def clipped_disc(radius, npts=14):
      disc = _ellipse(ex + tr.gaze[:, 0], idn.eye_y + tr.gaze[:, 1], radius, radius, npts)
      rel = np.clip((disc[..., 0] - ex) / idn.eye_hw, -1, 1)
      sh = (1 - rel ** 2) ** 0.75
      tl = -0.5 * idn.eye_tilt * side * rel
      y = np.clip(disc[..., 1], idn.eye_y - up_h * sh + tl, idn.eye_y + lo_h * sh + tl)
      return np.stack([disc[..., 0], y], -1)

    add("polygon", clipped_disc(idn.eye_hw * 0.52), idn.iris, depth=0.5)
    add("polygon", clipped_disc(idn.eye_hw * 0.22, 10), (15, 12, 12), depth=0.5)
    add("line", np.stack([xs, up], -1), _blend(idn.skin, (10, 5, 5), 0.8), width=2, depth=0.5)
    lid_colour = _blend(idn.skin, (0, 0, 0), 0.25)
    add("line", np.stack([xs, lo + 0.5], -1), lid_colour, width=1, depth=0.5)

  # Brows: inner end raised by AU1, outer by AU2, lowered and drawn together by AU4.
  bu = np.linspace(0, 1, 8)
  for side in (-1, 1):
    inner_x = cx + side * (idn.eye_dx - idn.brow_len * 0.45 - 1.5 * au["AU4"])
    base = idn.eye_y - idn.brow_gap
    y_in = base - 5.0 * au["AU1"] + 3.2 * au["AU4"] - 3.0 * a
    y_out = base + 1.0 - 4.5 * au["AU2"] + 1.5 * au["AU4"] - 2.6 * a
    arch = 1.6 + 1.8 * au["AU2"] + 1.2 * au["AU1"] - 1.0 * au["AU4"]
    line_x = inner_x[:, None] + side * idn.brow_len * bu[None]
    line_y = y_in[:, None] + (y_out - y_in)[:, None] * bu[None] - arch[:, None] * np.sin(np.pi * bu)[None]
    th = idn.brow_th * (1 - 0.45 * bu)[None]
    brow = np.concatenate([np.stack([line_x, line_y - th / 2], -1),
                           np.stack([line_x[:, ::-1], (line_y + th / 2)[:, ::-1]], -1)], 1)
    add("polygon", brow, idn.brow, depth=0.4, name=f"brow{side}")

  # Nose: bridge shade, nostrils, shadow under the tip (AU10 lifts the nostrils slightly).
  shade = _blend(idn.skin, (0, 0, 0), 0.22)
  add("line", np.array([[cx + 1.5, idn.eye_y + 2], [cx + 2.5, idn.nose_y - 5], [cx + idn.nose_w * 0.6, idn.nose_y - 1]]),
      shade, width=2, depth=0.9)
  for side in (-1, 1):
    add("polygon", _ellipse(cx + side * idn.nose_w * 0.45, idn.nose_y + 0.5 - 0.8 * au["AU10"], 1.7, 1.0, 10),
        _blend(idn.skin, (20, 5, 5), 0.6), depth=1.0)

  # Mouth: lips, dark interior, upper teeth.
  add("polygon", lips, idn.lips, depth=0.6, name="lips")
  add("polygon", mouth_in, (55, 20, 25), depth=0.6, name="mouth_in")
  add("polygon", teeth, (236, 232, 222), depth=0.6)

  if idn.glasses:
    for side in (-1, 1):
      ex = cx + side * idn.eye_dx
      add("line", np.array([[ex - 10, idn.eye_y - 6], [ex + 10, idn.eye_y - 6], [ex + 10, idn.eye_y + 6],
                            [ex - 10, idn.eye_y + 6], [ex - 10, idn.eye_y - 6]]), (30, 30, 35), width=2, depth=0.8)
    add("line", np.array([[cx - idn.eye_dx + 10, idn.eye_y - 3], [cx + idn.eye_dx - 10, idn.eye_y - 3]]),
        (30, 30, 35), width=2, depth=0.8)
  return parts


def _transform(pts, depth, idn: Identity, tr: FaceTrack):
  """Head pose of every frame applied to points [P, 2] or [T, P, 2]: yaw (sideways shift by
  depth), then roll and scale about the head centre, then shift. Output coordinates, [T, P, 2]."""
  n = len(tr)
  pts = np.array(np.broadcast_to(pts, (n,) + pts.shape[-2:]))
  pts[..., 0] += (tr.yaw * 7.0 * depth)[:, None]
  theta = np.deg2rad(tr.roll)
  cos, sin = (np.cos(theta) * tr.scale)[:, None], (np.sin(theta) * tr.scale)[:, None]
  centre = np.array([idn.head_cx, idn.head_cy])
  rel = pts - centre
  moved = np.stack([cos * rel[..., 0] - sin * rel[..., 1], sin * rel[..., 0] + cos * rel[..., 1]], -1)
  return moved + centre + tr.shift[:, None, :]


# iBUG 68-point indices into our part polygons (see `_face_parts` for their point order).
_JAW = np.round(np.linspace(18, 0, 17)).astype(int)          # head outline, image-left to right
_BROW = {-1: [7, 5, 4, 2, 0], 1: [0, 2, 4, 5, 7]}             # upper brow edge, image-left to right
_EYE = [0, 3, 7, 10, 14, 18]                                   # corner, upper lid, corner, lower lid
_MOUTH_OUTER = [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23]
_MOUTH_INNER = [0, 3, 6, 9, 12, 16, 19, 22]


def face_landmarks(idn: Identity, tr: FaceTrack) -> np.ndarray:
  """68 landmarks per frame in the iBUG order, in 112x112 output coordinates, [T, 68, 2].

  Read off the drawn shapes (jaw from the head outline, brows, eyes, lips); used to fill
  AffectNet's `facial_landmarks` column.
  """
  named = {p[5]: _transform(p[1], p[4], idn, tr) for p in _face_parts(idn, tr) if p[5]}
  cx = idn.head_cx
  bridge = np.stack([np.full(4, cx), np.linspace(idn.eye_y, idn.nose_y - 1.0, 4)], -1)
  nostrils = np.stack([cx + np.linspace(-0.7, 0.7, 5) * idn.nose_w, np.full(5, idn.nose_y + 0.5)], -1)
  return np.concatenate([
      named["head"][:, _JAW], named["brow-1"][:, _BROW[-1]], named["brow1"][:, _BROW[1]],
      _transform(bridge, 0.9, idn, tr), _transform(nostrils, 1.0, idn, tr),
      named["eye-1"][:, _EYE], named["eye1"][:, _EYE],
      named["lips"][:, _MOUTH_OUTER], named["mouth_in"][:, _MOUTH_INNER]], axis=1)


def render_faces(idn: Identity, scene: Scene, tr: FaceTrack):
  """Yields one 112x112 RGB PIL image per frame of `tr`."""
  parts = _face_parts(idn, tr)
  # One [T, P, 2] array for all parts, so each frame needs a single tolist().
  all_pts = np.concatenate([_transform(p[1], p[4], idn, tr) for p in parts], axis=1) * SUPERSAMPLE
  offsets = 2 * np.cumsum([0] + [p[1].shape[-2] for p in parts])
  for t in range(len(tr)):
    flat = all_pts[t].ravel().tolist()
    canvas = scene.background.copy()
    draw = ImageDraw.Draw(canvas)
    for k, (kind, _, colour, width, _, _) in enumerate(parts):
      fill = colour[t] if isinstance(colour, list) else colour
      xy = flat[offsets[k]:offsets[k + 1]]
      if kind == "polygon":
        draw.polygon(xy, fill=fill)
      else:
        draw.line(xy, fill=fill, width=width * SUPERSAMPLE, joint="curve")
    img = canvas.reduce(SUPERSAMPLE)
    if scene.low_res:
      img = img.resize((scene.low_res, scene.low_res), Image.BILINEAR).resize((FACE_SIZE, FACE_SIZE), Image.BILINEAR)
    img = ImageChops.multiply(img, scene.lighting)
    plus, minus = scene.noise[t % len(scene.noise)]
    img = ImageChops.subtract(ImageChops.add(img, plus), minus)
    yield img


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
  """Baseline JPEG bytes (deterministic for a given libjpeg)."""
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=int(quality))
  return buf.getvalue()
