"""SAM's image preprocessing has one home (sam_jax/utils/transforms.py): the training path (a
uint8 example from the loader, normalized inside the jitted step) and the inference path
(`prepare_image`, numpy on the host) give the same array, and each gives the bits it gave
before they shared the code.

"The same array" is to the last bit, except that XLA computes the division by the per-channel
std as a multiplication by its reciprocal (numpy divides, as the official torch code does), so
some of the training path's values (a fifth to a quarter here) are 1 ulp away; the padding is
exactly zero in both."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import configs, inference
from sam_jax.utils.transforms import ResizeLongestSide, normalize_padded, resize_and_pad

pytest.importorskip("tensorflow_datasets")  # sam_jax.training.data reads tfds datasets
from sam_jax.training import data  # noqa: E402

CONFIG = configs.tiny()
S = CONFIG.image_size


def _images():
    rng = np.random.default_rng(0)
    # landscape, portrait (padding on either side) and an exact fit (no padding)
    return [rng.integers(0, 256, shape, np.uint8) for shape in
            [(45, 70, 3), (90, 31, 3), (S, S, 3)]]


def _bits(x) -> np.ndarray:
    # float32 bit patterns: also tells 0.0 from -0.0
    return np.asarray(x, np.float32).view(np.uint32)


def _training_pixels(image):
    """What the train step feeds the encoder: the loader's example, normalized under jit."""
    mask = np.zeros((1,) + image.shape[:2], bool)
    mask[0, 5:20, 5:20] = True
    ex = data.make_example(image, mask, S, max_masks=2, rng=np.random.default_rng(0))
    normalize = jax.jit(lambda im, size: normalize_padded(im, size, CONFIG.pixel_mean,
                                                          CONFIG.pixel_std))
    batch = normalize(jnp.asarray(ex["image"][None]), jnp.asarray(ex["input_size"][None]))
    return np.asarray(batch[0]), tuple(ex["input_size"])


@pytest.mark.parametrize("index", range(3))
def test_training_and_inference_preprocessing_agree(index):
    image = _images()[index]
    prepared = inference.prepare_image(image, CONFIG)
    pixels, input_size = _training_pixels(image)
    assert prepared.pixels.dtype == np.float32 and pixels.dtype == np.float32
    assert prepared.input_size == input_size
    h, w = input_size
    np.testing.assert_array_equal(_bits(pixels[h:]), 0)  # +0.0, as inference's np.zeros
    np.testing.assert_array_equal(_bits(pixels[:, w:]), 0)
    np.testing.assert_array_equal(_bits(prepared.pixels[h:]), 0)
    np.testing.assert_array_equal(_bits(prepared.pixels[:, w:]), 0)
    # a difference of 1 between float32 bit patterns of the same sign is 1 ulp
    assert (np.sign(pixels) == np.sign(prepared.pixels)).all()
    ulps = np.abs(_bits(pixels).astype(np.int64) - _bits(prepared.pixels).astype(np.int64))
    assert ulps.max() <= 1
    np.testing.assert_allclose(pixels, prepared.pixels, rtol=2 ** -23, atol=0)


@pytest.mark.parametrize("index", range(3))
def test_same_bits_as_the_former_copies(index):
    image = _images()[index]
    mean = np.asarray(CONFIG.pixel_mean, np.float32)
    std = np.asarray(CONFIG.pixel_std, np.float32)
    # inference.prepare_image before: normalize the resized image, paste it into zeros
    resized = ResizeLongestSide(S).apply_image(image).astype(np.float32)
    h, w = resized.shape[:2]
    before = np.zeros((S, S, 3), np.float32)
    before[:h, :w] = (resized - mean) / std
    np.testing.assert_array_equal(_bits(inference.prepare_image(image, CONFIG).pixels),
                                  _bits(before))

    # train_step.normalize_images before, on the loader's padded uint8 batch
    padded, size = resize_and_pad(image, S)
    assert size == (h, w)
    images, sizes = jnp.asarray(padded[None]), jnp.asarray([size], jnp.int32)

    @jax.jit
    def former(images, input_size):
        x = (images.astype(jnp.float32) - jnp.asarray(CONFIG.pixel_mean, jnp.float32)) / \
            jnp.asarray(CONFIG.pixel_std, jnp.float32)
        inside = ((jnp.arange(S)[None, :, None] < input_size[:, 0, None, None])
                  & (jnp.arange(S)[None, None, :] < input_size[:, 1, None, None]))
        return jnp.where(inside[..., None], x, 0.0)

    now = jax.jit(lambda im, sz: normalize_padded(im, sz, CONFIG.pixel_mean,
                                                  CONFIG.pixel_std))(images, sizes)
    np.testing.assert_array_equal(_bits(now), _bits(former(images, sizes)))


def test_resize_and_pad_layout():
    image = _images()[0]
    padded, (h, w) = resize_and_pad(image, S)
    assert padded.dtype == np.uint8 and padded.shape == (S, S, 3)
    assert (h, w) == ResizeLongestSide.get_preprocess_shape(45, 70, S) == (82, S)
    np.testing.assert_array_equal(padded[:h, :w], ResizeLongestSide(S).apply_image(image))
    assert not padded[h:].any() and not padded[:, w:].any()
