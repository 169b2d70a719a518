"""Aff-Wild2 annotation parsing: formats, quirks and bad lines (file and line named)."""

import logging

import numpy as np
import pytest

from affect_jax.data import annotations
from affect_jax.data.builders.bad_data import BadDataError, BadDataLog

VA_HEADER = "valence,arousal"
EXPR_HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
AU_HEADER = "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26"


def parse(text, task, policy="error", path="ann/v.txt"):
  return annotations.parse_annotation_text(text, task, path, BadDataLog(policy))


def test_va_with_header_values_and_invalid_marker():
  parsed = parse(f"{VA_HEADER}\n0.25,-0.5\n-5,-5\n1,-1\n", "va")
  np.testing.assert_array_equal(parsed.values, np.float32([[0.25, -0.5], [-5, -5], [1, -1]]))
  np.testing.assert_array_equal(parsed.valid, [True, False, True])
  assert parsed.values.dtype == np.float32 and parsed.num_lines == 3


def test_header_detection_first_line_numbers_means_no_header():
  with_header = parse(f"{EXPR_HEADER}\n3\n-1\n7\n", "expr")
  without_header = parse("3\n-1\n7\n", "expr")
  for parsed in (with_header, without_header):
    np.testing.assert_array_equal(parsed.values, [3, -1, 7])
    np.testing.assert_array_equal(parsed.valid, [True, False, True])


def test_crlf_and_missing_final_newline_and_trailing_blank_lines():
  expected = parse("valence,arousal\n0.1,0.2\n0.3,0.4\n", "va")
  for text in ("valence,arousal\r\n0.1,0.2\r\n0.3,0.4", "valence,arousal\r\n0.1,0.2\r\n0.3,0.4\r\n\r\n",
               "\ufeffvalence,arousal\n0.1,0.2\n0.3,0.4"):
    parsed = parse(text, "va")
    np.testing.assert_array_equal(parsed.values, expected.values)
    np.testing.assert_array_equal(parsed.valid, expected.valid)


def test_au_any_minus_one_invalidates_the_frame():
  rows = ["1,0,1,0,1,0,1,0,1,0,1,0", "0,0,0,0,0,0,0,0,0,0,0,-1", "1,1,1,1,1,1,1,1,1,1,1,1"]
  parsed = parse(AU_HEADER + "\n" + "\n".join(rows), "au")
  np.testing.assert_array_equal(parsed.values[0], [1, 0] * 6)
  np.testing.assert_array_equal(parsed.values[1], [-1] * 12)
  np.testing.assert_array_equal(parsed.values[2], [1] * 12)
  np.testing.assert_array_equal(parsed.valid, [True, False, True])


def test_va_mixed_marker_makes_the_frame_invalid():
  parsed = parse("-5,0.3\n", "va")
  assert not parsed.valid[0]
  np.testing.assert_array_equal(parsed.values[0], [-5, -5])


@pytest.mark.parametrize("text, task, line, problem", [
    (f"{VA_HEADER}\n0.1,0.2\n0.1,0.2,0.3\n", "va", 3, "expected 2 comma-separated field(s)"),
    (f"{VA_HEADER}\n0.1,0.2\n0.1\n", "va", 3, "found 1"),
    (f"{VA_HEADER}\n0.1,0.2\n\n0.1,0.2\n", "va", 3, "found 0"),
    (f"{VA_HEADER}\n0.1,abc\n", "va", 2, "arousal field 'abc' is not a number"),
    (f"{VA_HEADER}\n0.1,nan\n", "va", 2, "arousal field 'nan' is not a number"),
    (f"{VA_HEADER}\n1.5,0.2\n", "va", 2, "valence 1.5 outside [-1, 1] and not the invalid marker -5"),
    (f"{VA_HEADER}\n0.1,-2\n", "va", 2, "arousal -2 outside [-1, 1]"),
    ("3\n8\n", "expr", 2, "expression value 8 not in 0..7 and not the invalid marker -1"),
    (f"{EXPR_HEADER}\n3\n-2\n", "expr", 3, "expression value -2 not in 0..7"),
    (f"{EXPR_HEADER}\n2.5\n", "expr", 2, "expression value 2.5 is not an integer"),
    (f"{EXPR_HEADER}\n1,2\n", "expr", 2, "expected 1 comma-separated field(s)"),
    (f"{AU_HEADER}\n" + ",".join(["0"] * 11) + ",2\n", "au", 2,
     "AU26 value 2 not in 0..1 and not the invalid marker -1"),
    (",".join(["0"] * 11) + "\n", "au", 1, "expected 12 comma-separated field(s)"),
])
def test_bad_line_error_names_file_line_and_problem(text, task, line, problem):
  with pytest.raises(BadDataError) as error:
    parse(text, task)
  assert f"ann/v.txt:{line}: " in str(error.value)
  assert problem in str(error.value)


@pytest.mark.parametrize("text", ["", "\n", "\r\n\r\n", f"{VA_HEADER}\n", f"{VA_HEADER}\r\n\r\n"])
def test_empty_annotation_file_is_an_error(text):
  with pytest.raises(BadDataError, match=r"ann/v\.txt: empty annotation file"):
    parse(text, "va")


def test_skip_keeps_frame_positions_counts_and_logs(caplog):
  log = BadDataLog("skip")
  text = f"{EXPR_HEADER}\n1\n9\n2\nx\n4\n"
  with caplog.at_level(logging.WARNING):
    parsed = annotations.parse_annotation_text(text, "expr", "ann/v.txt", log)
  # The bad lines 3 and 5 stay frames 2 and 4, unlabelled; later frames keep their numbers.
  np.testing.assert_array_equal(parsed.values, [1, -1, 2, -1, 4])
  np.testing.assert_array_equal(parsed.valid, [True, False, True, False, True])
  assert log.num_skipped == 2
  assert log.messages[0].startswith("ann/v.txt:3: expression value 9")
  assert log.messages[1].startswith("ann/v.txt:5: expression field 'x' is not a number")
  assert sum("Skipping bad data: ann/v.txt:3" in r.getMessage() for r in caplog.records) == 1


def test_skip_of_an_empty_file_returns_none_and_counts():
  log = BadDataLog("skip")
  assert annotations.parse_annotation_text("", "au", "ann/v.txt", log) is None
  assert log.num_skipped == 1 and "empty annotation file" in log.messages[0]


def test_read_annotation_file_and_not_utf8(tmp_path):
  path = tmp_path / "v.txt"
  path.write_bytes(b"valence,arousal\r\n0.5,0.5")
  parsed = annotations.read_annotation_file(path, "va", BadDataLog())
  np.testing.assert_array_equal(parsed.values, [[0.5, 0.5]])
  path.write_bytes(b"valence,arousal\n0.5,0.5\n\xff\xfe\n")
  with pytest.raises(BadDataError, match=rf"{path}:3: not UTF-8 text"):
    annotations.read_annotation_file(path, "va", BadDataLog())


def test_read_video_list_line_numbers(tmp_path):
  path = tmp_path / "list.txt"
  path.write_bytes(b"2-30-640x360\r\n\r\n10-60-1280x720_left\r\n  \r\n")
  assert annotations.read_video_list(path, BadDataLog()) == [(1, "2-30-640x360"), (3, "10-60-1280x720_left")]
  path.write_bytes(b"\n")
  with pytest.raises(BadDataError, match="empty test-set video list"):
    annotations.read_video_list(path, BadDataLog())


def test_invalid_labels_shapes_and_markers():
  for task, shape, marker in [("va", (4, 2), -5), ("expr", (4,), -1), ("au", (4, 12), -1)]:
    values, valid = annotations.invalid_labels(task, 4)
    assert values.shape == shape and (values == marker).all() and not valid.any()
