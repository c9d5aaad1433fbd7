"""Random variables of a model's exact tree without compiling it (`init_variables` compiles the
whole model, ~15 s on a small CPU): weights N(0, 0.02), layer-norm and layer-scale factors near
1, the prompt encoder's Fourier matrix N(0, 1)."""

import jax
import numpy as np

import sam_jax


def random_variables(cfg, seed=0):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        base, std = (1.0, 0.02) if name in ("scale", "lambda1") else (0.0, 0.02)
        if path[0].key == "buffers":
            std = 1.0
        return (base + std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, sam_jax.abstract_variables(cfg))
