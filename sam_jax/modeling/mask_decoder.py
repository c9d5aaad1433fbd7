"""Ports `segment_anything/modeling/mask_decoder.py`.

Masks are returned channels-first, (B, num_masks, 4h, 4w), like the official decoder, since
they are outputs rather than feature maps. The 2x2/stride-2 transposed convolutions are plain
matmuls (each input pixel writes its own 2x2 output block, so there is no overlap and no kernel
flip to get wrong); the kernel is stored (kh, kw, in, out). The upscaled features stay in
"sub-pixel" layout (h, w, 2, 2, [2, 2,] C) and only the final (B, M, 4h, 4w) masks are
interleaved: the same arithmetic without shuffling the large feature maps, which made the
upscaling 3x slower on CPU.
"""

import jax.numpy as jnp
import flax.linen as nn

from .common import LayerNorm, gelu, named, relu
from .transformer import TwoWayTransformer


class ConvTranspose2x2(nn.Module):
    """torch.nn.ConvTranspose2d(in, out, kernel_size=2, stride=2) on channels-last input,
    returned in sub-pixel layout: (..., in) -> (..., 2, 2, out), where [..., a, c, :] is output
    pixel (2i + a, 2j + c) of input pixel (i, j)."""

    features: int
    dtype: jnp.dtype = jnp.float32
    zero_init: bool = False  # a branch added to a trained model, which must start at no change

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        kernel = self.param("kernel", init, (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.einsum("...i,acio->...aco", x.astype(self.dtype), kernel.astype(self.dtype),
                       preferred_element_type=jnp.float32)
        return (y + bias).astype(self.dtype)


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (`layers.{i}` as the official)."""

    hidden_dim: int
    output_dim: int
    num_layers: int
    sigmoid_output: bool = False
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        dims = [self.hidden_dim] * (self.num_layers - 1) + [self.output_dim]
        self.layers = [named(self, f"layers.{i}", nn.Dense(d, dtype=self.dtype,
                                                            param_dtype=jnp.float32))
                       for i, d in enumerate(dims)]

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = relu(x)
        x = x.astype(jnp.float32)
        return nn.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(nn.Module):
    transformer_dim: int
    transformer_depth: int = 2
    transformer_num_heads: int = 8
    transformer_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        d, dt = self.transformer_dim, self.dtype
        self.num_mask_tokens = self.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(
            self.transformer_depth, d, self.transformer_num_heads, self.transformer_mlp_dim,
            attention_downsample_rate=self.attention_downsample_rate, dtype=dt)
        self.iou_token = nn.Embed(1, d)
        self.mask_tokens = nn.Embed(self.num_mask_tokens, d)
        self.output_upscaling = [
            named(self, "output_upscaling.0", ConvTranspose2x2(d // 4, dt)),
            named(self, "output_upscaling.1", LayerNorm(1e-6)),
            named(self, "output_upscaling.3", ConvTranspose2x2(d // 8, dt)),
        ]
        self.output_hypernetworks_mlps = [
            named(self, f"output_hypernetworks_mlps.{i}", MLP(d, d // 8, 3, dtype=dt))
            for i in range(self.num_mask_tokens)]
        self.iou_prediction_head = MLP(self.iou_head_hidden_dim, self.num_mask_tokens,
                                       self.iou_head_depth, dtype=dt)

    def __call__(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                 dense_prompt_embeddings, multimask_output: bool, token_mask=None,
                 upscaled_detail=None):
        """image_embeddings (B or 1, h, w, C); image_pe (h, w, C); sparse (B, T, C);
        dense (B or 1, h, w, C); token_mask (B, T) or None; upscaled_detail (B or 1, h, w, 2,
        2, 2, 2, C/8) or None, added to the upscaled features (an encoder's detail branch; the
        official decoder has none) -> masks (B, M, 4h, 4w), iou (B, M) with M = 3 if
        multimask_output else 1."""
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe,
                                             sparse_prompt_embeddings, dense_prompt_embeddings,
                                             token_mask, upscaled_detail)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]

    def predict_masks(self, image_embeddings, image_pe, sparse, dense, token_mask=None,
                      upscaled_detail=None):
        b = sparse.shape[0]
        out_tokens = jnp.concatenate([self.iou_token.embedding, self.mask_tokens.embedding], 0)
        out_tokens = jnp.broadcast_to(out_tokens, (b,) + out_tokens.shape)
        tokens = jnp.concatenate([out_tokens, sparse.astype(jnp.float32)], axis=1)
        if token_mask is not None:
            token_mask = jnp.concatenate(
                [jnp.ones((b, out_tokens.shape[1]), bool), token_mask.astype(bool)], axis=1)

        # One image and no per-prompt mask input: src has batch 1 and the first layer's
        # image-side projections run once for all prompts (the official code repeats them).
        src = image_embeddings + dense
        _, h, w, c = src.shape
        hs, src = self.transformer(src, image_pe[None], tokens, token_mask)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]

        up0, ln, up1 = self.output_upscaling
        x = src.reshape(b, h, w, c)
        x = gelu(up1(gelu(ln(up0(x)))))  # (B, h, w, 2, 2, 2, 2, C/8) sub-pixel layout
        if upscaled_detail is not None:
            x = x + upscaled_detail.astype(x.dtype)
        hyper_in = jnp.stack([mlp(mask_tokens_out[:, i, :])
                              for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1)
        # Mask index last: the large feature map is read in its own layout (contracting its
        # minor axis) and only the small result is transposed.
        masks = jnp.einsum("bhwacdek,bmk->bhwacdem", x, hyper_in.astype(self.dtype),
                           preferred_element_type=jnp.float32)
        # row 4i + 2a + d, column 4j + 2c + e
        masks = masks.transpose(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, -1, 4 * h, 4 * w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
