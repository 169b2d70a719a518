"""One table mapping each face dataset's expression codes onto the Aff-Wild2 8-class order.

Aff-Wild2 order (schema.EXPR_CLASSES): 0 Neutral, 1 Anger, 2 Disgust, 3 Fear, 4 Happiness,
5 Sadness, 6 Surprise, 7 Other. ``NO_LABEL`` (-1) marks codes that carry no usable expression; such
images are still stored (MAE pre-training uses every face), with ``has_label`` False.

| dataset   | code: name -> Aff-Wild2 index                                                       |
|-----------|-------------------------------------------------------------------------------------|
| affectnet | 0 Neutral->0, 1 Happiness->4, 2 Sadness->5, 3 Surprise->6, 4 Fear->3, 5 Disgust->2,  |
|           | 6 Anger->1, 7 Contempt->7 (Other), 8 None->-1, 9 Uncertain->-1, 10 Non-face->-1     |
| rafdb     | 1 Surprise->6, 2 Fear->3, 3 Disgust->2, 4 Happiness->4, 5 Sadness->5, 6 Anger->1,    |
|           | 7 Neutral->0                                                                        |
| fer2013   | 0 Angry->1, 1 Disgust->2, 2 Fear->3, 3 Happy->4, 4 Sad->5, 5 Surprise->6, 6 Neutral->0 |
| ferplus   | FER+ vote columns: 0 neutral->0, 1 happiness->4, 2 surprise->6, 3 sadness->5,       |
|           | 4 anger->1, 5 disgust->2, 6 fear->3, 7 contempt->7 (Other), 8 unknown->-1, 9 NF->-1 |

Contempt is not one of Aff-Wild2's six basic expressions or Neutral; Aff-Wild2 files every other
expression under "Other", so Contempt maps there.
"""

from __future__ import annotations

from affect_jax.data import schema

NO_LABEL = -1

_N, _ANG, _DIS, _FEA, _HAP, _SAD, _SUR, _OTH = range(len(schema.EXPR_CLASSES))

# dataset -> {source code: (source name, Aff-Wild2 index or NO_LABEL)}
EXPRESSION_TABLE: dict[str, dict[int, tuple[str, int]]] = {
    "affectnet": {
        0: ("Neutral", _N), 1: ("Happiness", _HAP), 2: ("Sadness", _SAD), 3: ("Surprise", _SUR),
        4: ("Fear", _FEA), 5: ("Disgust", _DIS), 6: ("Anger", _ANG), 7: ("Contempt", _OTH),
        8: ("None", NO_LABEL), 9: ("Uncertain", NO_LABEL), 10: ("Non-face", NO_LABEL),
    },
    "rafdb": {
        1: ("Surprise", _SUR), 2: ("Fear", _FEA), 3: ("Disgust", _DIS), 4: ("Happiness", _HAP),
        5: ("Sadness", _SAD), 6: ("Anger", _ANG), 7: ("Neutral", _N),
    },
    "fer2013": {
        0: ("Angry", _ANG), 1: ("Disgust", _DIS), 2: ("Fear", _FEA), 3: ("Happy", _HAP),
        4: ("Sad", _SAD), 5: ("Surprise", _SUR), 6: ("Neutral", _N),
    },
    "ferplus": {
        0: ("neutral", _N), 1: ("happiness", _HAP), 2: ("surprise", _SUR), 3: ("sadness", _SAD),
        4: ("anger", _ANG), 5: ("disgust", _DIS), 6: ("fear", _FEA), 7: ("contempt", _OTH),
        8: ("unknown", NO_LABEL), 9: ("NF", NO_LABEL),
    },
}

# FER+ vote columns of fer2013new.csv, in file order (index = FER+ code above).
FERPLUS_VOTE_COLUMNS = tuple(name for name, _ in EXPRESSION_TABLE["ferplus"].values())


def to_affwild2(dataset: str, code: int) -> int:
  """Aff-Wild2 class index (or NO_LABEL) of ``dataset``'s expression ``code``.

  Raises:
    KeyError: unknown dataset; ValueError: code outside the dataset's label space.
  """
  table = EXPRESSION_TABLE[dataset]
  if code not in table:
    raise ValueError(
        f"{dataset} has no expression code {code}; valid codes are {min(table)}..{max(table)}"
    )
  return table[code][1]
