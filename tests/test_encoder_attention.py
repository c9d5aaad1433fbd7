"""The image encoder's attention implementations (modeling/rel_pos_attention.py) against each
other and against the official encoder, on CPU.

"chunked" is the CPU path the parity suite has always run; "xla" batches all heads; "cudnn"
and "pallas" fold the relative-position bias into q and k. On CPU the Pallas kernels run in
interpret mode (the Triton kernel, and the TPU kernel under `force_tpu_interpret_mode`), and
cuDNN's kernel is replaced by XLA's reference attention on exactly the arguments we would hand
to cuDNN, so what is tested is our fold and our call. Shapes cover SAM's real ones: a 64x64
global grid, 14x14 windows (196 tokens: not a multiple of the kernels' 128-token block), and a
non-square grid (catches H/W swaps). Tolerances are at float32, highest matmul precision.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import sam_jax
from sam_jax.modeling import rel_pos_attention as rpa

PATHS = ("xla", "cudnn", "pallas", "pallas-tpu")


@pytest.fixture
def cudnn_as_xla(monkeypatch):
    """jax.nn.dot_product_attention answers calls made for cuDNN with XLA's implementation of
    the same function, after checking the call is one cuDNN takes (bf16/fp16 aside)."""
    real = jax.nn.dot_product_attention
    calls = []

    def fake(q, k, v, *args, implementation=None, **kwargs):
        assert implementation == "cudnn"
        assert q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0
        assert q.shape[-1] <= 256
        calls.append(q.shape)
        return real(q, k, v, *args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    return calls


def run_path(path, *args, **kwargs):
    """attention_with_rel_pos on one path; "pallas-tpu" is the TPU kernel in interpret mode."""
    if path == "pallas-tpu":
        with pltpu.force_tpu_interpret_mode(), rpa.tpu_kernel_on_cpu():
            return rpa.attention_with_rel_pos(*args, impl="pallas", **kwargs)
    return rpa.attention_with_rel_pos(*args, impl=path, **kwargs)


def random_inputs(b, h, w, heads, c, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, h * w, heads, c)), dtype) for _ in range(3))
    rel_h = jnp.asarray(0.5 * rng.normal(size=(2 * h - 1, c)), jnp.float32)
    rel_w = jnp.asarray(0.5 * rng.normal(size=(2 * w - 1, c)), jnp.float32)
    return q, k, v, rel_h, rel_w


def reference(q, k, v, rel_h, rel_w, hw, use_rel_pos=True):
    """The official `Attention.forward` formula in float64 numpy: scores, bias, softmax."""
    h, w = hw
    q, k, v = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))
    scores = q * q.shape[-1] ** -0.5 @ k.swapaxes(-1, -2)
    if use_rel_pos:
        idx = lambda n: np.arange(n)[:, None] - np.arange(n)[None, :] + n - 1  # noqa: E731
        rh, rw = np.asarray(rel_h, np.float64)[idx(h)], np.asarray(rel_w, np.float64)[idx(w)]
        b, n, t, c = q.shape
        grid = q.reshape(b, n, h, w, c)
        bias_h = np.einsum("bnhwc,hkc->bnhwk", grid, rh)
        bias_w = np.einsum("bnhwc,wkc->bnhwk", grid, rw)
        bias = bias_h[..., :, None] + bias_w[..., None, :]
        scores = scores + bias.reshape(b, n, t, t)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    out = (scores / scores.sum(-1, keepdims=True)) @ v
    return out.transpose(0, 2, 1, 3)


SHAPES = {  # (batch, H, W, heads, head dim)
    "non-square": (2, 8, 6, 2, 16),
    "window 14x14": (3, 14, 14, 2, 32),
    "global 64x64": (1, 64, 64, 1, 64),
}


@pytest.mark.parametrize("path", ("chunked",) + PATHS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_path_computes_sams_attention(path, shape, cudnn_as_xla):
    b, h, w, heads, c = SHAPES[shape]
    args = random_inputs(b, h, w, heads, c)
    expected = reference(*args, (h, w))
    out = jax.jit(lambda *a: run_path(path, *a, (h, w), chunk_size=2 * w))(*args)
    assert out.shape == (b, h * w, heads, c) and out.dtype == jnp.float32
    err = np.abs(np.asarray(out, np.float64) - expected).max()
    print(f"\n[attention] {path} {shape}: max abs err {err:.3g} (scale "
          f"{np.abs(expected).max():.3g})")
    assert err < 2e-6 * np.abs(expected).max()
    assert bool(cudnn_as_xla) == (path == "cudnn")  # the cuDNN path really asked for cuDNN


@pytest.mark.parametrize("path", PATHS)
def test_paths_without_relative_positions(path, cudnn_as_xla):
    b, h, w, heads, c = SHAPES["non-square"]
    q, k, v, _, _ = random_inputs(b, h, w, heads, c, seed=1)
    expected = reference(q, k, v, None, None, (h, w), use_rel_pos=False)
    out = run_path(path, q, k, v, None, None, (h, w), use_rel_pos=False)
    assert np.abs(np.asarray(out, np.float64) - expected).max() < 5e-6


@pytest.mark.parametrize("path", ["xla", "cudnn", "pallas"])
def test_gradients_match_the_chunked_path(path, cudnn_as_xla):
    """Training differentiates through the attention: d(loss)/d(q, k, v, tables) agree."""
    b, h, w, heads, c = SHAPES["non-square"]
    args = random_inputs(b, h, w, heads, c, seed=2)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(b, h * w, heads, c)))

    def loss(p, *a):
        return jnp.sum(weights * run_path(p, *a, (h, w), chunk_size=2 * w))

    grad = jax.grad(loss, argnums=(1, 2, 3, 4, 5))
    ref = grad("chunked", *args)
    for ours, theirs, name in zip(grad(path, *args), ref, ("q", "k", "v", "rel_h", "rel_w")):
        scale = float(jnp.abs(theirs).max())
        err = float(jnp.abs(ours - theirs).max())
        print(f"\n[attention grad] {path} d{name}: {err:.3g} of {scale:.3g}")
        assert err < 2e-6 * max(scale, 1.0), name


@pytest.mark.parametrize("path", ["xla", "cudnn", "pallas"])
def test_bfloat16_error_comparable_to_the_chunked_path(path, cudnn_as_xla):
    """In bfloat16 the fold stores the bias terms in bfloat16 (the chunked path keeps them in
    float32); its error against the float64 reference stays within 1.5x the chunked path's."""
    b, h, w, heads, c = SHAPES["window 14x14"]
    args32 = random_inputs(b, h, w, heads, c, seed=4)
    expected = reference(*args32, (h, w))
    bf16 = tuple(x.astype(jnp.bfloat16) for x in args32[:3]) + args32[3:]
    errors = {}
    for p in ("chunked", path):
        out = np.asarray(run_path(p, *bf16, (h, w), chunk_size=2 * w), np.float64)
        errors[p] = np.abs(out - expected).mean()
    print(f"\n[attention bf16] mean abs err {errors}")
    assert errors[path] <= 1.5 * errors["chunked"]
    assert errors[path] > 0  # it did run in bfloat16


def test_auto_chooses_per_backend(monkeypatch):
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert rpa.resolve_impl("auto", f32, 64, (64, 64), backend="cpu") == "chunked"
    assert rpa.resolve_impl("auto", bf16, 64, (64, 64), backend="cpu") == "chunked"
    assert rpa.resolve_impl("auto", bf16, 80, (64, 64), backend="tpu") == "pallas"
    monkeypatch.setattr(rpa, "_cudnn_max_head_dim", lambda: 256)  # Hopper
    assert rpa.resolve_impl("auto", bf16, 80, (64, 64), backend="gpu") == "cudnn"
    assert rpa.resolve_impl("auto", jnp.float16, 64, (14, 14), backend="gpu") == "cudnn"
    assert rpa.resolve_impl("auto", f32, 64, (64, 64), backend="gpu") == "xla"
    monkeypatch.setattr(rpa, "_cudnn_max_head_dim", lambda: 128)  # before Hopper
    assert rpa.resolve_impl("auto", bf16, 64, (64, 64), backend="gpu") == "xla"  # 192 wide
    assert rpa.resolve_impl("auto", bf16, 64, (14, 14), backend="gpu") == "cudnn"  # 96 wide
    assert rpa.resolve_impl("pallas", f32, 64, (64, 64), backend="cpu") == "pallas"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        rpa.resolve_impl("flash", f32, 64, (64, 64))
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        sam_jax.tiny().replace(attention_impl="flash")
    assert rpa.folded_head_dim(64, (64, 64)) == 192 and rpa.folded_head_dim(80, (64, 64)) == 208
    assert rpa.folded_head_dim(64, (14, 14)) == 96


# ---- whole encoders -------------------------------------------------------------------------

def encoder_config(name, depth=2, img_size=512):
    """The preset's widths and heads with `depth` blocks (windowed, then one global) at
    `img_size`: at 512 px a 32x32 global grid and 14x14 windows over a padded 42x42 (the
    attention tests above cover the full 64x64 grid; interpreted kernels make a whole 1024 px
    encoder minutes long)."""
    config = sam_jax.get_config(name)
    enc = dataclasses.replace(config.image_encoder, depth=depth,
                              global_attn_indexes=(depth - 1,), img_size=img_size)
    return config.replace(image_encoder=enc)


@pytest.fixture(scope="module")
def official_vit_b_encoder():
    """The official encoder (vit_b widths, 2 blocks, 512 px) with perturbed weights, our
    converted variables for it, and both embeddings of one normalized random image."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("segment_anything")
    import tempfile

    from official import save_and_load, seeded_official
    config = encoder_config("vit_b")
    official = seeded_official(config, seed=5, scale=0.02)
    with tempfile.TemporaryDirectory() as tmp:
        sam = save_and_load(official, tmp, config=config)
    size = config.image_size
    x = np.random.default_rng(5).normal(size=(1, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = official.image_encoder(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    return sam, jnp.asarray(x.transpose(0, 2, 3, 1)), expected


@pytest.mark.parametrize("path", ("chunked",) + PATHS)
def test_encoder_parity_with_official_on_every_path(official_vit_b_encoder, path,
                                                    cudnn_as_xla):
    """Each path's embedding is within the parity suite's tolerance (1e-4) of the official
    encoder's, for vit_b's widths and heads."""
    sam, x, expected = official_vit_b_encoder
    impl = "pallas" if path == "pallas-tpu" else path
    config = sam.config.replace(attention_impl=impl)
    embed = jax.jit(lambda v, im: sam_jax.build_module(config).apply(v, im, method="embed_image"))
    if path == "pallas-tpu":
        with pltpu.force_tpu_interpret_mode(), rpa.tpu_kernel_on_cpu():
            ours = embed(sam.variables, x)
    else:
        ours = embed(sam.variables, x)
    err = float(np.abs(np.asarray(ours) - expected).max())
    print(f"\n[parity] vit_b 2-block 512 px encoder, attention {path}: {err:.3g} (scale "
          f"{np.abs(expected).max():.3g})")
    assert err < 1e-4


def test_tiny_model_auto_on_cpu_is_the_chunked_path(tiny_sam):
    """"auto" on CPU traces exactly the chunked path (same HLO, so the same numbers)."""
    pixels = jnp.zeros((1, 128, 128, 3), jnp.float32)
    lower = lambda impl: jax.jit(  # noqa: E731
        lambda v, x: sam_jax.build_module(tiny_sam.config.replace(attention_impl=impl)).apply(
            v, x, method="embed_image")).lower(tiny_sam.variables, pixels).as_text()
    assert jax.default_backend() == "cpu"
    assert lower("auto") == lower("chunked")
    assert lower("auto") != lower("xla")
