"""Ports `segment_anything/modeling/sam.py`: the three parts under their state-dict names.

The official `Sam.forward` (a Python loop over images) is replaced by the pure, batched
functions in `sam_jax.inference`; this module only owns the submodules and exposes one method
per stage so each stage can be applied (and jitted) on its own:
`embed_image`, `encode_prompts`, `encode_tokens`, `dense_pe`, `decode`.
"""

import jax.numpy as jnp
import flax.linen as nn

from ..configs import Dinov2EncoderConfig, SamConfig
from .dinov2_encoder import Dinov2ImageEncoder
from .image_encoder import ImageEncoderViT
from .edge_refiner import EdgeRefiner
from .mask_decoder import MaskDecoder
from .mask_refiner import MaskRefiner
from .prompt_encoder import PromptEncoder


class Sam(nn.Module):
    config: SamConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.compute_dtype)
        grid = cfg.image_embedding_size
        if isinstance(cfg.image_encoder, Dinov2EncoderConfig):
            self.image_encoder = Dinov2ImageEncoder(cfg.image_encoder, dtype)
        else:
            self.image_encoder = ImageEncoderViT(cfg.image_encoder, cfg.attention_chunk_size,
                                                 dtype, cfg.attention_impl)
        self.prompt_encoder = PromptEncoder(cfg.prompt_encoder.embed_dim, (grid, grid),
                                            (cfg.image_size, cfg.image_size),
                                            cfg.prompt_encoder.mask_in_chans, dtype)
        md = cfg.mask_decoder
        self.mask_decoder = MaskDecoder(md.transformer_dim, md.transformer_depth,
                                        md.transformer_num_heads, md.transformer_mlp_dim,
                                        md.attention_downsample_rate, md.num_multimask_outputs,
                                        md.iou_head_depth, md.iou_head_hidden_dim, dtype)
        if cfg.mask_refiner is not None:
            self.mask_refiner = MaskRefiner(cfg.mask_refiner.width, cfg.mask_refiner.dilations,
                                            dtype,
                                            embedding_input=cfg.mask_refiner.embedding_input,
                                            click_input=cfg.mask_refiner.click_input,
                                            subpixel=cfg.mask_refiner.subpixel_output)
        if cfg.edge_refiner is not None:
            self.edge_refiner = EdgeRefiner(cfg.edge_refiner.width, cfg.edge_refiner.dilations,
                                            dtype)

    def embed_image(self, images, deterministic: bool = True):
        """(B, S, S, 3) normalized, padded images -> (B, g, g, 256), g = S / patch size. Training passes
        deterministic=False (and a "dropout" rng) to turn on drop path."""
        return self.image_encoder(images, deterministic)

    def backbone_features(self, images):
        """A pretrained backbone's features before the neck (DINOv2 encoders only): what a
        frozen-backbone training run computes once and caches."""
        return self.image_encoder.backbone(images)

    def embed_features(self, features):
        """Cached backbone features -> image embeddings (the neck only)."""
        return self.image_encoder.neck(features)

    def detail_features(self, images):
        """The detail block's features alone (DINOv2 encoders with `detail_layer`): what a
        frozen-backbone cache adds for the detail branch."""
        return self.image_encoder.detail_features(images)

    def _split_embeddings(self, image_embeddings):
        """An embedding -> SAM's part (out_chans) and the detail branch's upscaled features in
        the decoder's sub-pixel layout (None without a branch)."""
        c = self.config.image_encoder.out_chans
        if image_embeddings.shape[-1] != self.config.embedding_channels:
            raise ValueError(f"image embeddings have {image_embeddings.shape[-1]} channels, "
                             f"this model takes {self.config.embedding_channels}")
        if image_embeddings.shape[-1] == c:
            return image_embeddings, None
        detail = image_embeddings[..., c:].reshape(image_embeddings.shape[:3]
                                                   + (2, 2, 2, 2, c // 8))
        return image_embeddings[..., :c], detail

    def encode_prompts(self, points=None, boxes=None, masks=None):
        """Official prompt-encoder semantics (see PromptEncoder.__call__)."""
        return self.prompt_encoder(points, boxes, masks)

    def encode_tokens(self, coords, labels):
        return self.prompt_encoder.embed_tokens(coords, labels)

    def encode_masks(self, masks):
        return self.prompt_encoder.embed_masks(masks)

    def no_mask_dense(self, batch: int):
        return self.prompt_encoder.no_mask_dense(batch)

    def dense_pe(self):
        return self.prompt_encoder.get_dense_pe()

    def decode(self, image_embeddings, sparse, dense, multimask_output: bool, token_mask=None):
        embeddings, detail = self._split_embeddings(image_embeddings)
        return self.mask_decoder(embeddings, self.prompt_encoder.get_dense_pe(), sparse,
                                 dense, multimask_output, token_mask, detail)

    def decode_all(self, image_embeddings, sparse, dense, token_mask=None):
        """All 1 + num_multimask_outputs masks and IoU predictions, unsliced (training picks
        the single-mask or the multimask outputs per prompt)."""
        embeddings, detail = self._split_embeddings(image_embeddings)
        return self.mask_decoder.predict_masks(embeddings, self.prompt_encoder.get_dense_pe(),
                                               sparse, dense, token_mask, detail)

    def refiner_features(self, images, image_embeddings=None):
        """(B, S, S, 3) normalized, padded images [and their embeddings, for a refiner that
        reads them] -> the mask refiner's image features (B, S/2, S/2, width), computed once
        per image like the embedding."""
        if image_embeddings is not None:
            image_embeddings = self._split_embeddings(image_embeddings)[0]
        return self.mask_refiner.image_features(images, image_embeddings)

    def refine_masks(self, refiner_features, low_res, coords=None, labels=None):
        """refiner_features (B, s, s, width), low_res (B, N, L, L) logits [, the prompts'
        coords (B, T, 2) and labels (B, T) in the input frame, which a refiner with
        `click_input` reads; its N masks share them] -> (B, N, s, s) refined logits over the
        padded input frame (s = S / 2, or S with `subpixel_output`)."""
        if coords is not None and self.mask_refiner.click_input:
            n = low_res.shape[1]
            coords = jnp.broadcast_to(coords[:, None], (coords.shape[0], n) + coords.shape[1:])
            labels = jnp.broadcast_to(labels[:, None], (labels.shape[0], n) + labels.shape[1:])
        else:
            coords = labels = None
        return self.mask_refiner.refine(refiner_features, low_res, coords, labels)

    def refine_edges(self, images, logits, image_index):
        """images (I, H, W, 3) normalized at their original size (unpadded), logits (B, N, H,
        W) over the same pixels and image_index (B,) (the image each row reads) -> (B, N, H, W)
        logits with the edge stage's residual added (computed on the tiles around the
        outlines only)."""
        b, n, h, w = logits.shape
        out = self.edge_refiner.refine_tiles(images, logits.reshape(b * n, h, w),
                                             jnp.repeat(image_index, n))
        return out.reshape(b, n, h, w)

    def __call__(self, images, coords, labels, mask_inputs):
        """Every stage once (a mask prompt and the no-mask embedding): creates all variables."""
        emb = self.embed_image(images)
        sparse = self.encode_tokens(coords, labels)
        dense = jnp.concatenate([self.encode_masks(mask_inputs),
                                 self.no_mask_dense(mask_inputs.shape[0])], axis=0)
        out = self.decode(emb, jnp.concatenate([sparse, sparse], 0), dense, True)
        if self.config.mask_refiner is not None:
            self.refine_masks(self.refiner_features(images, emb), out[0][:images.shape[0]],
                              coords[:images.shape[0]], labels[:images.shape[0]])
        if self.config.edge_refiner is not None:
            # over the images' pixels, as at the original size (only the shapes matter here)
            # (the dense network: the tiled one reads the weights this creates)
            self.edge_refiner(images, jnp.zeros((images.shape[0], 1) + images.shape[1:3]))
        return out
