"""affect_jax.compilation_cache: the entry points store compiled programs per machine and reuse them.

The cache is per process state in JAX, so each case runs in a fresh interpreter; the second
process must load the first one's program (JAX's own cache-hit event) and compute the same numbers.
"""

import json
import os
import stat
import subprocess
import sys
import textwrap

from affect_jax import compilation_cache

_CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from affect_jax import compilation_cache
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
    path = compilation_cache.enable()
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0 + 1.0)
    y = f(jnp.arange(12.0).reshape(3, 4) / 10)
    print("RESULT " + json.dumps(dict(path=path, hits=len(hits), y=[float(v) for v in y],
          min_seconds=jax.config.jax_persistent_cache_min_compile_time_secs)))
""")

_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f\n\n" \
           "processor\t: 1\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f\n"


def _run(tmp_path, **env_overrides):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu", **env_overrides)
  proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env,
                        timeout=300, check=True)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][0]
  return json.loads(line[len("RESULT "):])


def test_second_process_loads_the_first_ones_program(tmp_path):
  first = _run(tmp_path)
  expected = os.path.join(str(tmp_path / "xdg"), "affect_jax", "xla-" + compilation_cache.machine_tag())
  assert first["path"] == expected
  assert first["hits"] == 0 and first["min_seconds"] == 0.0  # every program stored, however quick
  assert stat.S_IMODE(os.stat(expected).st_mode) == 0o700  # JAX runs what it finds there
  assert any(name.startswith("jit_") for name in os.listdir(expected))
  second = _run(tmp_path)
  assert second["hits"] >= 1
  assert second["y"] == first["y"]


def test_the_users_choice_wins(tmp_path):
  mine = tmp_path / "mine"
  chosen = _run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(mine), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="5")
  assert chosen["path"] == str(mine) and chosen["min_seconds"] == 5.0
  assert not (tmp_path / "xdg").exists()
  off = _run(tmp_path, JAX_ENABLE_COMPILATION_CACHE="false")
  assert off["path"] is None and off["hits"] == 0
  assert not (tmp_path / "xdg").exists()


def test_the_directory_follows_the_cpu_and_jaxlib():
  import jaxlib  # pylint: disable=g-import-not-at-top
  tag = compilation_cache.machine_tag(_CPUINFO)
  assert tag == compilation_cache.machine_tag(_CPUINFO.replace("\t\t:", " :"))  # spacing is not a CPU
  assert f"jaxlib{jaxlib.__version__}" in tag
  assert compilation_cache.machine_tag(_CPUINFO.replace(" avx512f", "")) != tag
  assert compilation_cache.machine_tag(_CPUINFO.replace("AMD EPYC", "Intel Xeon")) != tag
