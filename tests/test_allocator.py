"""affect_jax.allocator: the entry points cap glibc's malloc arenas; threads then share them.

Each case runs in a fresh interpreter (arenas, once made, stay for the life of a process) and
counts the process's arenas from glibc's own report (`malloc_info`: one <heap> per arena).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from affect_jax import allocator

_CHILD = textwrap.dedent("""
    import ctypes, os, sys, tempfile, threading
    import numpy as np
    from affect_jax import allocator
    if sys.argv[1] == "limit":
      print("LIMITED", allocator.limit_arenas())
    barrier = threading.Barrier(8)
    def work():
      barrier.wait()  # all eight allocate at once, so glibc would give each its own arena
      arrays = [np.ones(4096 + i) for i in range(200)]
      del arrays
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc = allocator.glibc()
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    path = os.path.join(tempfile.mkdtemp(), "info.xml")
    f = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    print("ARENAS", open(path).read().count("<heap nr="))
""")


def _run(mode, **env):
  child_env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
  child_env.update(env)
  out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                       env=child_env, timeout=120, check=True).stdout
  values = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("ARENAS", "LIMITED")))
  return int(values["ARENAS"]), values.get("LIMITED")


@pytest.mark.skipif(allocator.glibc() is None, reason="glibc's malloc arenas")
def test_threads_share_two_arenas_once_capped():
  default, _ = _run("default")
  capped, limited = _run("limit")
  assert limited == "True"
  assert default > 2, default  # the uncapped process: the threads got arenas of their own
  assert capped <= 2, capped


@pytest.mark.skipif(allocator.glibc() is None, reason="glibc's malloc arenas")
def test_the_users_setting_wins():
  arenas, limited = _run("limit", MALLOC_ARENA_MAX="3")
  assert limited == "False"
  assert arenas <= 3, arenas
