"""Ports `segment_anything/modeling/common.py`: the MLP block and the channel LayerNorm.

We work channels-last (NHWC), so the official `LayerNorm2d` (a LayerNorm over the channel
axis of an NCHW tensor, eps 1e-6) is a plain LayerNorm over the last axis here.
Layer norms always compute in float32, whatever the compute dtype.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

# torch's nn.GELU is the exact (erf) GELU; jax.nn.gelu defaults to the tanh approximation.
gelu = lambda x: jax.nn.gelu(x, approximate=False)  # noqa: E731
relu = jax.nn.relu


def _dot_f32_accumulate(lhs, rhs, dimension_numbers, precision=None,
                        preferred_element_type=None, **kwargs):
    # Accumulate in float32 whatever the input dtype: for bfloat16 inputs this both keeps the
    # sums accurate and selects XLA:CPU's fast bf16 GEMM (a bf16-output dot is ~2x slower).
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=jnp.float32, **kwargs)


def dense(features: int, name: str, dtype, use_bias: bool = True) -> nn.Dense:
    """A Linear layer with float32 params, `dtype` inputs and float32 accumulation."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    dot_general=_dot_f32_accumulate, name=name)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with torch's parameter names (`weight` -> `scale`, `bias`).

    Statistics are taken in float32 (bf16 variance is too coarse); the result is cast back to
    the input dtype. `eps` is 1e-6 in the image encoder and LayerNorm2d, but torch's default
    1e-5 inside the two-way transformer.
    """

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (dim,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (dim,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(x.dtype)


class MLPBlock(nn.Module):
    """lin1 -> act -> lin2, as the official MLPBlock."""

    embedding_dim: int
    mlp_dim: int
    act: Callable = gelu
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.mlp_dim, "lin1", self.dtype)(x)
        return dense(self.embedding_dim, "lin2", self.dtype)(self.act(x))


def named(parent: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Registers `module` under `name` inside `parent.setup()` and returns the bound child.

    Flax forbids `name=` in setup, and its list auto-naming gives `blocks_0`; registering by
    attribute lets a child carry the PyTorch state-dict name (`blocks.0`, `neck.2`), which
    makes checkpoint conversion a rule instead of a table."""
    setattr(parent, name, module)
    return getattr(parent, name)
