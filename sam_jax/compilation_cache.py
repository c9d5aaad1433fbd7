"""JAX's persistent compilation cache for sam_jax (no counterpart in the official repository,
where PyTorch runs eagerly and compiles nothing).

Every new process compiles SAM's jitted functions again (the image encoder, one decoder per
prompt bucket); with the cache on, a later process loads the compiled executables from disk
instead. `enable()` is one call for scripts and the CLI:

    sam_jax.compilation_cache.enable()          # <cache_dir()>/jax_compilation_cache
    sam_jax.compilation_cache.enable("/tmp/c")  # or a directory of your choice

`SAM_JAX_NO_COMPILATION_CACHE=1` turns it into a no-op. The directory is trusted input: JAX
runs what it finds there, so do not point it at a folder others can write to.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["DISABLE_ENV", "default_dir", "enable"]

DISABLE_ENV = "SAM_JAX_NO_COMPILATION_CACHE"


def default_dir() -> str:
    """<hub.cache_dir()>/jax_compilation_cache: beside the downloaded checkpoints."""
    from .hub import cache_dir

    return os.path.join(cache_dir(), "jax_compilation_cache")


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def enable(cache_dir: Optional[str | os.PathLike] = None) -> Optional[str]:
    """Turns on JAX's persistent compilation cache and returns its directory; None (and nothing
    changed) when $SAM_JAX_NO_COMPILATION_CACHE is set or JAX's own switch
    (`jax_enable_compilation_cache`) is off. Idempotent.

    The directory is `cache_dir`, else the one already given to JAX (JAX_COMPILATION_CACHE_DIR),
    else `default_dir()`. Every compilation is cached, however quick or small: JAX's defaults
    skip those under 1 s, which would leave out the decoder buckets that together make most
    of a CLI run's start-up on an accelerator."""
    if _disabled():
        return None
    import jax

    if not jax.config.jax_enable_compilation_cache:
        return None
    current = jax.config.jax_compilation_cache_dir
    path = os.path.abspath(os.path.expanduser(os.fspath(cache_dir or current or default_dir())))
    os.makedirs(path, exist_ok=True)
    if current != path:
        jax.config.update("jax_compilation_cache_dir", path)
        if current:
            # JAX opens its cache once per process, at the first compilation: re-open it here
            from jax.experimental.compilation_cache import compilation_cache

            compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # -1, not 0: 0 lets JAX raise the minimum entry size to suit the file system, -1 caches
    # every entry (the documented "cache everything" setting)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
