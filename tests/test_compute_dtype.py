"""compute_dtype="bfloat16": float32 params, bfloat16 matmuls, results close to float32.

The tiny model has windowed and global (chunked) attention blocks, so both attention layouts
and the bfloat16-only softmax-denominator column are exercised."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_truck
from sam_jax import inference


@pytest.fixture(scope="module")
def both(tiny_sam):
    """(float32, bfloat16) configs and the prepared truck image."""
    f32 = tiny_sam.config
    return f32, f32.replace(compute_dtype="bfloat16"), inference.prepare_image(
        load_truck((300, 200)), f32).pixels[None]


def test_bfloat16_matmuls_and_float32_params(tiny_sam, both):
    _, bf16, pixels = both
    text = inference.embed_images.lower(tiny_sam.variables, pixels, config=bf16).as_text()
    assert "dot_general" in text and "bf16" in text
    leaves = jax.tree_util.tree_leaves(tiny_sam.variables)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)


def test_bfloat16_close_to_float32(tiny_sam, both):
    f32, bf16, pixels = both
    emb32 = np.asarray(inference.embed_images(tiny_sam.variables, pixels, config=f32))
    emb16 = np.asarray(inference.embed_images(tiny_sam.variables, pixels, config=bf16))
    assert emb16.dtype == np.float32 and emb16.shape == emb32.shape
    # bfloat16 keeps 8 bits of mantissa: errors of a few 1e-3 relative to the values' scale.
    scale = np.abs(emb32).max()
    assert np.abs(emb16 - emb32).max() < 0.03 * scale
    assert np.abs(emb16 - emb32).mean() < 0.005 * scale
    assert not np.allclose(emb16, emb32, atol=1e-6 * scale, rtol=0)  # it did run in bf16

    rng = np.random.default_rng(0)
    prompts = inference.make_prompt_batch(
        f32, coords=rng.uniform(0, 128, (8, 2, 2)), labels=rng.integers(0, 2, (8, 2)))
    low32, iou32 = inference.decode_prompts(tiny_sam.variables, jnp.asarray(emb32), prompts,
                                            config=f32)
    low16, iou16 = inference.decode_prompts(tiny_sam.variables, jnp.asarray(emb32), prompts,
                                            config=bf16)
    low32, low16 = np.asarray(low32), np.asarray(low16)
    assert np.abs(low16 - low32).max() < 0.05 * np.abs(low32).max()
    assert np.abs(np.asarray(iou16) - np.asarray(iou32)).max() < 0.02
    assert ((low16 > 0) == (low32 > 0)).mean() > 0.98
