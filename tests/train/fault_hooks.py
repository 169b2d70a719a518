r"""`affect_jax.main` with test-only hooks, for the fault-injection tests.

  python tests/train/fault_hooks.py --config=configs/va.py:size=smoke --workdir=W [...]

runs exactly what `python -m affect_jax.main` runs, plus, driven by environment variables:

  AFFECT_JAX_TEST_EVENTS=FILE   appends one JSON line per event to FILE: `batch` (the stage, the step it
                                trains and the SHA-256 of the global batch it sees), `eval_start`,
                                `eval_end`, `save` (issued; the write goes on in the background).
  AFFECT_JAX_TEST_KILL=P:N:D    SIGKILLs this process D seconds after the N-th event of phase P
                                (batch, eval, save) of this process. For `eval` the kill is sure to
                                land before the evaluation returns: the evaluation waits for it.

Events are written with os.write on an O_APPEND descriptor, so a SIGKILL loses none of them.
"""

import hashlib
import json
import os
import signal
import sys
import threading
import time

from absl import app
import jax
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from affect_jax import main as affect_main  # pylint: disable=g-import-not-at-top,wrong-import-position
from affect_jax.train import checkpointing  # pylint: disable=g-import-not-at-top,wrong-import-position
from affect_jax.train import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position

_EVENTS = os.environ.get("AFFECT_JAX_TEST_EVENTS")
_KILL = os.environ.get("AFFECT_JAX_TEST_KILL")
_fd = os.open(_EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if _EVENTS else None
_counts = {}
_kill_armed = threading.Event()
_event_lock = threading.Lock()  # `sigkill` is the last event: it holds this lock until the kill lands


def _write_event(kind, **fields):
  if _fd is not None:
    os.write(_fd, (json.dumps(dict(event=kind, pid=os.getpid(), time=time.time(), **fields)) + "\n")
             .encode())


def _event(kind, **fields):
  with _event_lock:
    _write_event(kind, **fields)


def _sigkill_self():
  _event_lock.acquire()  # never released: no thread logs another event between these two lines
  _write_event("sigkill")
  os.kill(os.getpid(), signal.SIGKILL)


def _maybe_kill(phase):
  """Arms the planned SIGKILL when `phase` reaches its planned occurrence."""
  _counts[phase] = _counts.get(phase, 0) + 1
  if not _KILL:
    return False
  kill_phase, occurrence, delay = _KILL.split(":")
  if kill_phase != phase or int(occurrence) != _counts[phase] or _kill_armed.is_set():
    return False
  _kill_armed.set()
  timer = threading.Timer(float(delay), _sigkill_self)
  timer.daemon = True
  timer.start()
  return True


def batch_digest(batch):
  """SHA-256 over every array of a (global) batch, keys in sorted order."""
  digest = hashlib.sha256()
  for key in sorted(batch):
    value = np.asarray(jax.device_get(batch[key]))
    digest.update(key.encode())
    digest.update(str(value.dtype).encode() + str(value.shape).encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


_original_run_loop = trainer.run_loop
_original_save = checkpointing.Checkpointer.save


def _run_loop(loop, writer):
  train_step, evaluate, stage = loop.train_step, loop.evaluate, loop.config.stage

  def logged_step(state, batch):
    step = int(jax.device_get(state.step)) + 1
    _event("batch", stage=stage, step=step, sha=batch_digest(batch))
    _maybe_kill("batch")
    return train_step(state, batch)

  def logged_evaluate(state, step):
    _event("eval_start", stage=stage, step=step)
    armed = _maybe_kill("eval")
    result = evaluate(state, step)
    if armed:
      time.sleep(3600)  # the armed SIGKILL lands before this evaluation returns
    _event("eval_end", stage=stage, step=step)
    return result

  loop.train_step = logged_step
  if evaluate is not None:
    loop.evaluate = logged_evaluate
  return _original_run_loop(loop, writer)


def _save(self, step, state, data_iterator=None, metrics=None):
  _original_save(self, step, state, data_iterator, metrics)
  _event("save", step=int(step), directory=self.directory)
  _maybe_kill("save")


trainer.run_loop = _run_loop
checkpointing.Checkpointer.save = _save

if __name__ == "__main__":
  _event("start", argv=sys.argv[1:])
  app.run(affect_main.main)
