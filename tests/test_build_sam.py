"""sam_jax/build_sam.py: random variables for a config, compiled once per config."""

import jax
import numpy as np

import sam_jax
from sam_jax.build_sam import _jitted_init, abstract_variables, init_variables


def test_init_variables_compiles_once_per_config_and_follows_the_key():
    cfg = sam_jax.tiny()
    a = init_variables(cfg, jax.random.key(0))
    b = init_variables(cfg, jax.random.key(1))
    again = init_variables(cfg, jax.random.key(0))
    assert _jitted_init(cfg)._cache_size() == 1  # three calls, one trace
    leaves = list(zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]),
                      jax.tree.leaves(again["params"])))
    assert all(np.array_equal(x, z) for x, _, z in leaves)  # same key, same values
    assert any(not np.array_equal(x, y) for x, y, _ in leaves)  # another key, others
    # the shapes are the abstract ones; another config is its own function
    assert jax.tree.map(np.shape, a) == jax.tree.map(lambda s: s.shape,
                                                     abstract_variables(cfg))
    other = cfg.replace(compute_dtype="bfloat16")
    assert _jitted_init(other) is not _jitted_init(cfg)
