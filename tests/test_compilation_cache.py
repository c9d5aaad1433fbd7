"""Tests for sam_jax/compilation_cache.py: each run is a fresh Python process (JAX opens its
persistent cache once per process, at the first compilation), so every case runs a subprocess.

A cache hit is read from `jax.monitoring` events ('/jax/compilation_cache/cache_hits' and
'cache_misses'), which JAX records at each persistent-cache lookup: a public listener API rather
than the private counters in jax._src.compilation_cache. The file count is checked too: a hit
adds no entry.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles one small jitted function after `enable(argv[1] or None)`; prints what happened.
SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from sam_jax import compilation_cache

events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
first = compilation_cache.enable(sys.argv[1] or None)
again = compilation_cache.enable(sys.argv[1] or None)
y = jax.jit(lambda x: jnp.sin(x) * 2.0 + x.sum())(jnp.arange(16.0)).block_until_ready()
print(json.dumps({"dir": first, "again": again,
                  "config_dir": jax.config.jax_compilation_cache_dir,
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses"),
                  "y0": float(y[0])}))
"""


def run(cache_dir, **env):
    environment = dict(os.environ, JAX_PLATFORMS="cpu")
    # conftest turns the cache off for the suite; these subprocesses decide for themselves
    environment.pop("SAM_JAX_NO_COMPILATION_CACHE", None)
    environment.pop("JAX_COMPILATION_CACHE_DIR", None)
    environment.update(env)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO,
                                                               os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(cache_dir or "")],
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def entries(directory):
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, _, names in os.walk(directory) for name in names)


def test_entries_written_then_hit(tmp_path):
    cache = tmp_path / "jax_cache"
    first = run(cache)
    assert first["dir"] == first["again"] == first["config_dir"] == str(cache)
    assert first["misses"] >= 1 and first["hits"] == 0, first
    written = entries(cache)
    assert written, "no cache entry was written"

    second = run(cache)
    assert second["hits"] >= 1 and second["misses"] == 0, second
    assert second["y0"] == first["y0"]
    assert entries(cache) == written  # a hit adds nothing


def test_default_dir_is_under_the_sam_jax_cache(tmp_path):
    out = run(None, SAM_JAX_CACHE_DIR=str(tmp_path / "home"))
    expected = tmp_path / "home" / "jax_compilation_cache"
    assert out["dir"] == str(expected) and out["misses"] >= 1
    assert entries(expected)


def test_env_var_turns_it_off(tmp_path):
    cache = tmp_path / "jax_cache"
    out = run(cache, SAM_JAX_NO_COMPILATION_CACHE="1")
    assert out["dir"] is None and out["again"] is None and out["config_dir"] is None
    assert out["hits"] == out["misses"] == 0
    assert not cache.exists()


SWITCH = r"""
import sys
import jax, jax.numpy as jnp
from sam_jax import compilation_cache

compilation_cache.enable(sys.argv[1])
jax.jit(lambda x: x * 3.0)(jnp.ones(4)).block_until_ready()
compilation_cache.enable(sys.argv[2])  # JAX opened its cache at argv[1]: re-opened here
jax.jit(lambda x: jnp.cos(x) - 1.0)(jnp.ones(4)).block_until_ready()
"""


def test_a_new_directory_takes_effect_after_compiling(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    environment = dict(os.environ, JAX_PLATFORMS="cpu",
                       PYTHONPATH=os.pathsep.join(filter(None, [REPO,
                                                                os.environ.get("PYTHONPATH")])))
    environment.pop("JAX_COMPILATION_CACHE_DIR", None)
    environment.pop("SAM_JAX_NO_COMPILATION_CACHE", None)
    result = subprocess.run([sys.executable, "-c", SWITCH, str(first), str(second)],
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert entries(first) and entries(second)
    assert not set(entries(first)) & set(entries(second))  # each holds its own function
