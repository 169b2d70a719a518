"""Record layouts shared by the dataset builders, the feature store and the pipelines.

Aff-Wild2 is stored as two TFDS builder configs of the `affwild2` builder:

* ``frames``: one record per frame of every video in the split (a frame exists if it has a
  face image or an annotation line). Used by fine-tuning and feature extraction.
* ``videos``: one record per video, labels only (no pixels). The per-video view: frame count and
  which tasks label it, without scanning frames.

A video may be labelled for one task in ``Train_Set`` and another in ``Validation_Set``; each split
carries only the labels from that split's annotation folders, the others are marked invalid.

Feature store (written by the ``extract`` stage): one record per video, the ``videos`` fields plus
``features`` ``[num_frames, dim]`` float32.

Label conventions (after parsing; the raw files use -5 / -1 as invalid markers):
  va    float32[2]   valence, arousal in [-1, 1]; ``va_valid`` False where the file said -5
  expr  int32        0..7 in EXPR_CLASSES order; ``expr_valid`` False where the file said -1
  au    int32[12]    0/1 in AU_NAMES order; ``au_valid`` False where any of the 12 was -1
Frames with no annotation line for a task are invalid for that task.
"""

EXPR_CLASSES = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other")
AU_NAMES = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26")
TASKS = ("va", "expr", "au")
NUM_OUTPUTS = {"va": 2, "expr": len(EXPR_CLASSES), "au": len(AU_NAMES)}

# Keys of a `frames` record (numpy values once read through tfds.data_source).
FRAME_KEYS = (
    "video_id",    # str, e.g. "1-30-1280x720" or "10-60-1280x720_left"
    "frame",       # int32, 1-based frame number (image name %05d.jpg)
    "has_face",    # bool, an aligned face image exists for this frame
    "image",       # bytes, the original JPEG file bytes (no re-encode); b"" when has_face is False
    "va", "va_valid",
    "expr", "expr_valid",
    "au", "au_valid",
)

# Keys of a `videos` record; arrays have length num_frames, index k-1 is frame k.
VIDEO_KEYS = (
    "video_id",    # str
    "num_frames",  # int32
    "has_face",    # bool[T]
    "va", "va_valid",        # float32[T, 2], bool[T]
    "expr", "expr_valid",    # int32[T], bool[T]
    "au", "au_valid",        # int32[T, 12], bool[T]
    "labels_va", "labels_expr", "labels_au",  # bool: the task has an annotation file for this video in this split
)

# A feature-store record is a `videos` record plus:
FEATURE_KEYS = VIDEO_KEYS + ("features",)  # float32[T, D]
