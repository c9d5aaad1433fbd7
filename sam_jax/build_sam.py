"""Ports the model half of `segment_anything/build_sam.py`: the Flax module and its variables
from a config.

Variables are `{"params": ..., "buffers": ...}`; "buffers" holds the prompt encoder's random
Fourier matrix, which is not trained.

The official names (`sam_model_registry`, `build_sam`, `build_sam_vit_{h,l,b}`: a model from a
checkpoint path, or untrained) are in `sam_jax/__init__.py`, next to `load`, which they call:
here they would close an import circle (`checkpoints` imports this module).
"""

from typing import Any, Dict, Union

import jax
import jax.numpy as jnp

from .configs import SamConfig, get_config
from .modeling import Sam

Variables = Dict[str, Any]


def build_module(config: Union[SamConfig, str]) -> Sam:
    """The Flax module (no variables) for a config or a preset name. Named `build_module`, not
    `build_sam`: `sam_jax.build_sam` is the official builder (a model with weights)."""
    if isinstance(config, str):
        config = get_config(config)
    return Sam(config)


def _init_args(config: SamConfig):
    s = config.image_size
    m = 4 * config.image_embedding_size
    return (jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, 2, 2), jnp.float32),
            jnp.ones((1, 2), jnp.int32), jnp.zeros((1, m, m, 1), jnp.float32))


def init_variables(config: SamConfig, rng: jax.Array) -> Variables:
    """Randomly initialized variables (for training from scratch and tests)."""
    return jax.jit(lambda r: Sam(config).init(r, *_init_args(config)))(rng)


def abstract_variables(config: SamConfig) -> Variables:
    """Shapes and dtypes of the variables, without allocating them."""
    return jax.eval_shape(lambda: Sam(config).init(jax.random.key(0), *_init_args(config)))
