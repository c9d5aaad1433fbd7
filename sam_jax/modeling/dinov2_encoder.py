"""A pretrained DINOv2 ViT as SAM's image encoder: the backbone, then SAM's neck to 256 channels.

Lightweight-encoder SAMs (MobileSAM, EfficientSAM, EfficientViT-SAM) keep SAM's prompt
encoder and mask decoder and swap the image encoder; this is the same idea with DINOv2, whose
patch features already separate objects well. Parameter names mirror the Hugging Face
`Dinov2Model` state dict (`embeddings.*`, `encoder.layer.N.*`, `layernorm.*`) so conversion
is a rule (`sam_jax/checkpoints/dinov2_onnx.py`); the neck is SAM's (`neck.0..3`).

The backbone runs at a fixed input size: its 37x37 pretraining position table is resized to
the patch grid with PyTorch's bicubic rule (what `Dinov2Model.interpolate_pos_encoding` does on
every call), as a constant matrix product, so the converted table is kept as it was trained.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from .common import LayerNorm, dense, gelu, named
from .mask_decoder import ConvTranspose2x2


def _cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
    """The 4 taps of the Keys cubic kernel (PyTorch's a = -0.75) at fractional offset t."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


@functools.lru_cache(maxsize=None)
def bicubic_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix of torch's `interpolate(mode="bicubic", align_corners=False)`
    along one axis: half-pixel centres, source indexes clamped at the borders, no antialias."""
    m = np.zeros((size_out, size_in), np.float64)
    scale = size_in / size_out
    for i in range(size_out):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        for k, w in enumerate(_cubic_weights(src - base)):
            m[i, min(max(base - 1 + k, 0), size_in - 1)] += w
    return m


class Dinov2Embeddings(nn.Module):
    """Patch projection, the class token, and the position table resized to the grid."""

    patch_size: int
    hidden_size: int
    num_positions: int  # patches in the pretraining grid (37 * 37 for DINOv2)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        b = pixels.shape[0]
        p = self.patch_size
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=jnp.float32, name="patch_embeddings.projection")(pixels)
        gh, gw = x.shape[1], x.shape[2]
        x = x.reshape(b, gh * gw, self.hidden_size).astype(jnp.float32)
        init = nn.initializers.truncated_normal(0.02)
        cls = self.param("cls_token", init, (1, 1, self.hidden_size))
        table = self.param("position_embeddings", init,
                           (1, 1 + self.num_positions, self.hidden_size))
        side = math.isqrt(self.num_positions)
        grid = table[0, 1:].reshape(side, side, self.hidden_size)
        rows = jnp.asarray(bicubic_resize_matrix(side, gh), jnp.float32)
        cols = jnp.asarray(bicubic_resize_matrix(side, gw), jnp.float32)
        grid = jnp.einsum("hH,wW,HWc->hwc", rows, cols, grid,
                          precision=jax.lax.Precision.HIGHEST)
        pos = jnp.concatenate([table[:, :1], grid.reshape(1, gh * gw, -1)], axis=1)
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden_size)), x], axis=1)
        return tokens + pos, (gh, gw)


class Dinov2SelfAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        head = self.hidden_size // self.num_heads
        split = lambda y: y.reshape(b, t, self.num_heads, head).astype(self.dtype)  # noqa: E731
        q = split(dense(self.hidden_size, "attention.query", self.dtype)(x))
        k = split(dense(self.hidden_size, "attention.key", self.dtype)(x))
        v = split(dense(self.hidden_size, "attention.value", self.dtype)(x))
        out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head))
        return dense(self.hidden_size, "output.dense", self.dtype)(out.reshape(b, t, -1))


class LayerScale(nn.Module):
    @nn.compact
    def __call__(self, x):
        gamma = self.param("lambda1", nn.initializers.constant(1.0), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Dinov2Layer(nn.Module):
    """Pre-norm block with layer scale on both residual branches."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = LayerNorm(self.eps, name="norm1")(x)
        y = Dinov2SelfAttention(self.hidden_size, self.num_heads, self.dtype,
                                name="attention")(y)
        x = x + LayerScale(name="layer_scale1")(y.astype(jnp.float32))
        y = LayerNorm(self.eps, name="norm2")(x)
        y = dense(int(self.hidden_size * self.mlp_ratio), "mlp.fc1", self.dtype)(y)
        y = dense(self.hidden_size, "mlp.fc2", self.dtype)(gelu(y))
        return x + LayerScale(name="layer_scale2")(y.astype(jnp.float32))


class DetailBranch(nn.Module):
    """HQ-SAM's early-layer fusion: (B, g, g, embed_dim) features of an early block ->
    (B, g, g, 2, 2, 2, 2, width) in the mask decoder's sub-pixel layout of its 4x-upscaled
    features, which they are added to. The last layer starts at zero, so a model given the
    branch decodes exactly as before it was trained."""

    width: int  # the decoder's upscaled channels (transformer_dim / 8)
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.norm_in = LayerNorm(1e-6)
        self.up0 = ConvTranspose2x2(2 * self.width, self.dtype)
        self.norm_mid = LayerNorm(1e-6)
        self.up1 = ConvTranspose2x2(self.width, self.dtype, zero_init=True)

    def __call__(self, features):
        x = self.up0(self.norm_in(features.astype(jnp.float32)))
        return self.up1(gelu(self.norm_mid(x))).astype(jnp.float32)


class Dinov2ImageEncoder(nn.Module):
    """(B, S, S, 3) normalized, padded images -> (B, S/14, S/14, C) embeddings: C = out_chans,
    plus `detail_channels` with a detail branch (`Dinov2EncoderConfig.detail_layer`).

    `backbone` gives the DINOv2 patch features after its final layer norm, (B, g, g, 384)
    [followed by the detail block's residual stream, 384 more]; `neck` maps them to SAM's
    embedding [followed by the detail branch's output, flattened per cell]. Training with a
    frozen backbone caches `backbone`'s output once and trains `neck` and the decoder on it.
    Carrying the detail inside the embedding keeps one array per image everywhere an
    embedding is stored, batched or sharded."""

    config: "Dinov2EncoderConfig"  # noqa: F821
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.embeddings = Dinov2Embeddings(cfg.patch_size, cfg.embed_dim, cfg.num_positions,
                                           self.dtype)
        self.layers = [named(self, f"encoder.layer.{i}",
                             Dinov2Layer(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio,
                                         cfg.layer_norm_eps, self.dtype))
                       for i in range(cfg.depth)]
        self.layernorm = LayerNorm(cfg.layer_norm_eps)
        conv = lambda k: nn.Conv(cfg.out_chans, (k, k), padding=[(k // 2, k // 2)] * 2,  # noqa
                                 use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
        self.neck_layers = [named(self, "neck.0", conv(1)), named(self, "neck.1", LayerNorm(1e-6)),
                            named(self, "neck.2", conv(3)), named(self, "neck.3", LayerNorm(1e-6))]
        if cfg.detail_layer:
            # under "neck." so that everything that trains or exports the head takes it along
            self.detail = named(self, "neck.detail", DetailBranch(cfg.out_chans // 8,
                                                                  self.dtype))

    def _grid(self, pixels):
        return self.embeddings(pixels.astype(self.dtype))

    @staticmethod
    def _patches(x, grid):
        return x[:, 1:].reshape(x.shape[0], grid[0], grid[1], -1)

    def detail_features(self, pixels):
        """The residual stream after block `detail_layer` only (B, g, g, embed_dim): what a
        frozen-backbone cache adds for the detail branch, at a quarter of the backbone's cost."""
        x, grid = self._grid(pixels)
        for layer in self.layers[:self.config.detail_layer]:
            x = layer(x)
        return self._patches(x, grid)

    def backbone(self, pixels):
        x, grid = self._grid(pixels)
        detail = None
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 == self.config.detail_layer:
                detail = self._patches(x, grid)
        out = self._patches(self.layernorm(x), grid)
        return out if detail is None else jnp.concatenate([out, detail], axis=-1)

    def neck(self, features):
        cfg = self.config
        if features.shape[-1] != cfg.feature_channels:
            raise ValueError(f"backbone features have {features.shape[-1]} channels, this "
                             f"encoder takes {cfg.feature_channels}")
        x = features[..., :cfg.embed_dim].astype(self.dtype)
        for layer in self.neck_layers:
            x = layer(x)
        x = x.astype(jnp.float32)
        if not cfg.detail_layer:
            return x
        detail = self.detail(features[..., cfg.embed_dim:])
        return jnp.concatenate([x, detail.reshape(x.shape[:3] + (-1,))], axis=-1)

    def __call__(self, pixels, deterministic: bool = True):
        del deterministic  # no stochastic layers: the backbone is used as pretrained
        return self.neck(self.backbone(pixels))
