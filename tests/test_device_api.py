"""The device-resident batched API (`sam_jax.device_predict`, `SamPredictor.predict_jax`), the
counterpart of the official `predict_torch`, on the tiny model:
- equal to `SamPredictor.predict_batch` (which builds its batch on the host) for points,
  boxes, points + box, mask inputs, multimask on and off, thresholded masks and logits;
- no host round trip: runs under `jax.transfer_guard("disallow")` with device inputs and
  returns jax arrays, and traces whole under `jax.jit` (any host read of a value would fail);
- several images through `image_index`, equal to each image decoded on its own;
- data-parallel on 8 fake CPU devices (subprocess), equal to one device;
- one compilation of the decoder and the upscaling per shape bucket;
- shape errors raised before tracing, naming the problem."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from conftest import load_truck
from sam_jax import device_predict, inference
from sam_jax.device_predict import predict_on_device
from sam_jax.modeling import PAD_LABEL

W, H = 300, 200  # non-square on purpose
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def predictor(tiny_sam):
    p = sam_jax.SamPredictor(tiny_sam)
    p.set_image(load_truck((W, H)))
    return p


def grid(config):
    return 4 * config.image_embedding_size


def _prompts(predictor, kind, b=5, n=3, seed=0):
    """Prompts of one structure in the original frame (for predict_batch) and the same in the
    model frame as device arrays (for predict_jax), as predict_batch transforms them."""
    rng = np.random.default_rng(seed)
    h, w = predictor.original_size
    host = {}
    if "points" in kind:
        host["point_coords"] = rng.uniform(0, [w, h], (b, n, 2))
        host["point_labels"] = rng.integers(0, 2, (b, n))
    if "box" in kind:
        x0, y0 = rng.uniform(0, [w / 2, h / 2], (b, 2)).T
        host["boxes"] = np.stack([x0, y0, x0 + rng.uniform(5, w / 2, b),
                                  y0 + rng.uniform(5, h / 2, b)], 1)
    if "mask" in kind:
        g = grid(predictor.model.config)
        host["mask_input"] = (rng.normal(size=(b, 1, g, g)) * 4).astype(np.float32)
    size = predictor.original_size
    device = dict(host)
    if "point_coords" in host:
        device["point_coords"] = predictor.transform.apply_coords(host["point_coords"], size)
        device["point_coords"] = device["point_coords"].astype(np.float32)
        device["point_labels"] = host["point_labels"].astype(np.int32)
    if "boxes" in host:
        device["boxes"] = predictor.transform.apply_boxes(host["boxes"], size).astype(np.float32)
    return host, jax.device_put(device)


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---- (a) equal to predict_batch -----------------------------------------------------------------

KINDS = ["points", "box", "points+box", "mask", "points+mask", "points+box+mask"]


@pytest.mark.parametrize("return_logits", [False, True], ids=["masks", "logits"])
@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("kind", KINDS)
def test_equals_predict_batch(predictor, kind, multimask, return_logits):
    """The device token rule and padding build the batch make_prompt_batch builds, so the
    outputs are bit-identical (max abs difference observed: 0.0 for all)."""
    host, device = _prompts(predictor, kind)
    ref = predictor.predict_batch(**host, multimask_output=multimask,
                                  return_logits=return_logits)
    out = predictor.predict_jax(**device, multimask_output=multimask,
                                return_logits=return_logits)
    channels = 3 if multimask else 1
    assert out.masks.shape == (5, channels, H, W)
    assert out.masks.dtype == (jnp.float32 if return_logits else jnp.bool_)
    assert out.iou_predictions.shape == (5, channels)
    assert out.low_res_logits.shape == (5, channels) + (grid(predictor.model.config),) * 2
    for name, a, b in zip(out._fields, out, ref):
        assert isinstance(a, jax.Array) and a.shape == b.shape, name
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)


def test_low_res_only_without_output_size(predictor):
    host, device = _prompts(predictor, "points+box")
    ref = predictor.predict_batch(**host)
    out = predictor.predict_jax(**device, upscale=False)
    assert out.masks is None
    np.testing.assert_array_equal(np.asarray(out.iou_predictions), ref[1])
    np.testing.assert_array_equal(np.asarray(out.low_res_logits), ref[2])
    cfg = predictor.model.config
    direct = predict_on_device(predictor.model.variables, predictor.features,
                               device["point_coords"], device["point_labels"],
                               boxes=device["boxes"], config=cfg)
    assert direct.masks is None
    np.testing.assert_array_equal(np.asarray(direct.low_res_logits), ref[2])


def test_pad_label_points_are_absent(predictor):
    """Prompts with fewer points than N, padded with PAD_LABEL, equal those prompts alone
    (different token buckets, so equal up to float rounding; observed <= 4e-7 on logits,
    <= 6e-8 on IoU)."""
    cfg = predictor.model.config
    rng = np.random.default_rng(5)
    counts = [1, 3, 2, 1]
    coords = rng.uniform(0, 128, (4, 3, 2)).astype(np.float32)
    labels = rng.integers(0, 2, (4, 3)).astype(np.int32)
    for i, c in enumerate(counts):
        labels[i, c:] = PAD_LABEL
    padded = predict_on_device(predictor.model.variables, predictor.features,
                               jnp.asarray(coords), jnp.asarray(labels), config=cfg)
    for i, c in enumerate(counts):
        alone = predict_on_device(predictor.model.variables, predictor.features,
                                  jnp.asarray(coords[i:i + 1, :c]),
                                  jnp.asarray(labels[i:i + 1, :c]), config=cfg)
        for name, a, b in zip(padded._fields[1:], padded[1:], alone[1:]):
            print(f"PAD_LABEL prompt {i} {name}: max abs diff {_max_diff(a[i], b[0]):.3g}")
            assert _max_diff(a[i], b[0]) <= 1e-6, (i, name, _max_diff(a[i], b[0]))


# ---- (b) no host round trip ---------------------------------------------------------------------

def test_runs_under_transfer_guard_and_stays_on_device(tiny_sam):
    """Device inputs in, jax arrays out, nothing crossing between host and device; the first
    call (tracing and compiling) runs inside the guard too. A fresh image size and bucket, so
    this test compiles whatever other tests compiled already."""
    cfg = tiny_sam.config
    p = sam_jax.SamPredictor(tiny_sam)
    p.set_image(load_truck((170, 230)))
    host, device = _prompts(p, "points+box+mask", b=3, n=5, seed=1)
    with jax.transfer_guard("disallow"):
        out = p.predict_jax(**device)
        low_only = predict_on_device(tiny_sam.variables, p.features, device["point_coords"],
                                     device["point_labels"], config=cfg,
                                     boxes=device["boxes"], mask_inputs=device["mask_input"],
                                     multimask_output=False)
        for x in (*out, *low_only[1:]):
            assert isinstance(x, jax.Array) and not isinstance(x, np.ndarray)
        # The guard is live: a host array sent to the device is refused, and so would an
        # eager slice be (its start index comes from the host; hence `_first_rows` is jitted).
        with pytest.raises(Exception, match=r"[Dd]isallowed host-to-device"):
            out.iou_predictions + np.ones((1, 3), np.float32)
        with pytest.raises(Exception, match=r"[Dd]isallowed host-to-device"):
            predict_on_device(tiny_sam.variables, p.features, host["point_coords"],
                              host["point_labels"], config=cfg)
        if jax.default_backend() != "cpu":
            # On CPU a device array IS host memory: np.asarray is zero-copy and not guarded,
            # which is why the trace test below is the backend-independent proof.
            with pytest.raises(Exception, match=r"[Dd]isallowed device-to-host"):
                np.asarray(out.masks)
    assert out.masks.shape == (3, 3, 230, 170) and low_only.masks is None
    ref = p.predict_batch(**host)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_traces_whole_under_jit(predictor):
    """predict_on_device traces with every array input abstract: reading any value on the host
    (np.asarray, float(), `if x.any()`) would raise during tracing, as shown first. The jitted
    whole equals the eager call (observed: max abs difference 0.0, masks identical)."""
    def reads_host(x):
        return np.asarray(x) + 1

    with pytest.raises(jax.errors.TracerArrayConversionError):
        jax.jit(reads_host)(jnp.ones(3))
    cfg = predictor.model.config
    _, device = _prompts(predictor, "points+mask", b=4, n=2, seed=2)
    call = functools.partial(predict_on_device, config=cfg, input_size=predictor.input_size,
                             original_size=predictor.original_size)
    args = (predictor.model.variables, predictor.features, device["point_coords"],
            device["point_labels"])
    jitted = jax.jit(lambda *a, mask_inputs: call(*a, mask_inputs=mask_inputs))(
        *args, mask_inputs=device["mask_input"])
    eager = call(*args, mask_inputs=device["mask_input"])
    print("jit vs eager: logits", _max_diff(jitted.low_res_logits, eager.low_res_logits),
          "iou", _max_diff(jitted.iou_predictions, eager.iou_predictions),
          "masks", (np.asarray(jitted.masks) == np.asarray(eager.masks)).mean())
    assert _max_diff(jitted.low_res_logits, eager.low_res_logits) <= 1e-6
    assert _max_diff(jitted.iou_predictions, eager.iou_predictions) <= 1e-6
    assert (np.asarray(jitted.masks) == np.asarray(eager.masks)).mean() >= 0.9999


# ---- (c) several images -------------------------------------------------------------------------

def test_several_images_equal_each_image_alone(tiny_sam):
    """Two images of one size (so the masks upscale alike) and prompts interleaved over them
    through image_index equal predict_batch on a predictor holding each image (the batched
    path gathers a per-prompt embedding, the single-image path shares one; observed: max
    abs difference 0.0 on logits and IoU, masks identical)."""
    cfg = tiny_sam.config
    images = [load_truck((W, H)), load_truck((W, H))[::-1].copy()]
    predictors = []
    for im in images:
        p = sam_jax.SamPredictor(tiny_sam)
        p.set_image(im)
        predictors.append(p)
    embeddings = jnp.concatenate([p.features for p in predictors])
    assert embeddings.shape[0] == 2
    index = np.array([0, 1, 1, 0, 1, 0])
    host, device = _prompts(predictors[0], "points+box", b=len(index), n=2, seed=3)
    out = predict_on_device(tiny_sam.variables, embeddings, device["point_coords"],
                            device["point_labels"], boxes=device["boxes"],
                            image_index=jax.device_put(index.astype(np.int32)), config=cfg,
                            input_size=predictors[0].input_size,
                            original_size=predictors[0].original_size)
    for img, p in enumerate(predictors):
        rows = np.nonzero(index == img)[0]
        masks, iou, low = p.predict_batch(**{k: v[rows] for k, v in host.items()})
        tag = f"image {img}"
        print(tag, "logits", _max_diff(np.asarray(out.low_res_logits)[rows], low),
              "iou", _max_diff(np.asarray(out.iou_predictions)[rows], iou),
              "masks", (np.asarray(out.masks)[rows] == masks).mean())
        np.testing.assert_allclose(np.asarray(out.low_res_logits)[rows], low, atol=1e-6, rtol=0,
                                   err_msg=tag)
        np.testing.assert_allclose(np.asarray(out.iou_predictions)[rows], iou, atol=1e-6,
                                   rtol=0, err_msg=tag)
        assert (np.asarray(out.masks)[rows] == masks).mean() >= 0.9999, tag


# ---- (d) on a mesh --------------------------------------------------------------------------

MESH_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    import sam_jax
    from sam_jax import inference, sharding
    from sam_jax.device_predict import predict_on_device
    assert len(jax.devices()) == 8, jax.devices()
    cfg = sam_jax.tiny()
    variables = sam_jax.init_variables(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 128, 128, 3)).astype(np.float32)
    emb = inference.embed_images(variables, images, config=cfg)
    p, g = 16, 4 * cfg.image_embedding_size
    prompts = dict(coords=rng.uniform(0, 128, (p, 2, 2)).astype(np.float32),
                   labels=rng.integers(0, 2, (p, 2)).astype(np.int32),
                   boxes=np.concatenate([rng.uniform(0, 60, (p, 2)),
                                         rng.uniform(64, 128, (p, 2))], 1).astype(np.float32),
                   mask_inputs=rng.normal(size=(p, 1, g, g)).astype(np.float32),
                   image_index=(np.arange(p) % 4).astype(np.int32))
    sizes = dict(input_size=(96, 128), original_size=(150, 200))
    one = jax.devices()[0]
    single = predict_on_device(jax.device_put(variables, one), jax.device_put(emb, one),
                               **jax.device_put(prompts, one), config=cfg, **sizes)
    mesh = sharding.data_mesh()
    rep_vars, rep_emb = sharding.replicate(variables, mesh), sharding.replicate(emb, mesh)
    sharded_prompts = sharding.shard_batch(prompts, mesh)

    def compare(out, ref, rows):
        for name, x in zip(out._fields, out):
            assert x.shape[0] == rows and len(x.sharding.device_set) == 8, (name, x.sharding)
        d = max(np.abs(np.asarray(a, float) - np.asarray(b, float)).max()
                for a, b in zip(out[1:], ref[1:]))
        agree = (np.asarray(out.masks) == np.asarray(ref.masks)).mean()
        print(rows, "prompts: max abs diff", d, "mask agreement", agree)
        assert d < 1e-5 and agree >= 0.9999

    with jax.transfer_guard("disallow"):
        out = predict_on_device(rep_vars, rep_emb, **sharded_prompts, config=cfg, mesh=mesh,
                                **sizes)
    for name, x in zip(out._fields, out):  # 2 prompts a device, each decoded where it lies
        assert x.addressable_shards[0].data.shape[0] == p // 8, (name, x.sharding)
    compare(out, single, p)
    # without mesh=: XLA's propagation over sharded inputs, correct as well
    compare(predict_on_device(rep_vars, rep_emb, **sharded_prompts, config=cfg, **sizes),
            single, p)
    # 3 prompts (not a multiple of 8): padded to 8 on the mesh, the padding dropped after
    three = {k: v[:3] for k, v in prompts.items()}
    compare(predict_on_device(rep_vars, rep_emb, **three, config=cfg, mesh=mesh, **sizes),
            predict_on_device(variables, emb, **three, config=cfg, **sizes), 3)
    # a model averaging over the mirror images: they are replicated with the embeddings
    mirror = cfg.replace(mirror_average=True)
    mirrored = inference.mirror_images(variables, images, [128, 96, 128, 64], config=mirror)
    single = predict_on_device(variables, emb, **prompts, config=mirror, mirrored=mirrored,
                               **sizes)
    assert np.abs(np.asarray(single.low_res_logits) -
                  np.asarray(predict_on_device(variables, emb, **prompts, config=cfg,
                                               **sizes).low_res_logits)).max() > 1e-3
    compare(predict_on_device(rep_vars, rep_emb, **sharded_prompts, config=mirror, mesh=mesh,
                              mirrored=mirrored, **sizes), single, p)
    # a model with an edge stage (its tiled loop runs on each device's own prompts): its image
    # input is replicated with the embeddings
    from sam_jax.configs import EdgeRefinerConfig
    edge = cfg.replace(edge_refiner=EdgeRefinerConfig(4, (1, 2)))
    edge_vars = sam_jax.init_variables(edge, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(5), 16))
    edge_vars["params"]["edge_refiner"] = jax.tree.map(
        lambda x: 0.3 * jax.random.normal(next(keys), x.shape), edge_vars["params"]["edge_refiner"])
    edge_emb = inference.embed_images(edge_vars, images, config=edge)
    photos = rng.integers(0, 256, (4, 150, 200, 3)).astype(np.uint8)
    pixels = inference.edge_features(edge_vars, photos, config=edge)
    single = predict_on_device(edge_vars, edge_emb, **prompts, config=edge,
                               edge_features=pixels, **sizes)
    plain = predict_on_device(edge_vars, edge_emb, **prompts, config=edge, **sizes)
    assert (np.asarray(single.masks) != np.asarray(plain.masks)).mean() > 1e-3
    rep_edge_vars = sharding.replicate(edge_vars, mesh)
    rep_edge_emb = sharding.replicate(edge_emb, mesh)
    compare(predict_on_device(rep_edge_vars, rep_edge_emb, **sharded_prompts, config=edge,
                              mesh=mesh, edge_features=sharding.replicate(pixels, mesh),
                              **sizes), single, p)
    compare(predict_on_device(rep_edge_vars, rep_edge_emb, **sharded_prompts, config=edge,
                              edge_features=sharding.replicate(pixels, mesh), **sizes), single, p)
    print("OK")
""")


def test_sharded_on_8_cpu_devices_equals_one_device():
    """Prompts sharded along P over the `data` axis, variables and embeddings replicated
    (under the transfer guard); the outputs stay sharded along P (2 prompts a device) and
    equal the one-device result; so do the same inputs without `mesh=` and 3 prompts padded
    to 8 on the mesh, a model averaging over the mirror images and one with an edge stage
    (observed max abs difference 0 to ~1e-7; mask agreement 1.0)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


# ---- (e) no retrace -----------------------------------------------------------------------------

def test_one_compilation_per_bucket(predictor):
    """New values of the same shapes compile nothing; prompt counts 9..16 (bucket 16) and 4..5
    points (+ the not-a-point token: token bucket 8) compile the decoder and the upscaling once
    in all; only the small padding step (`device_prompt_batch`) sees each raw shape. (Shapes
    no other test uses, so the counts are this test's own.)"""
    caches = lambda: (device_predict.device_prompt_batch._cache_size(),  # noqa: E731
                      inference.decode_shown._cache_size(),
                      inference.postprocess_masks._cache_size())
    rng = np.random.default_rng(7)

    def call(b, n):
        coords = jax.device_put(rng.uniform(0, 128, (b, n, 2)).astype(np.float32))
        labels = jax.device_put(rng.integers(0, 2, (b, n)).astype(np.int32))
        return predictor.predict_jax(coords, labels, multimask_output=False)

    call(11, 5)  # compiles what is not compiled yet
    before = caches()
    first = call(11, 5)
    second = call(11, 5)
    assert caches() == before, "same shapes, new values: traced again"
    assert _max_diff(first.low_res_logits, second.low_res_logits) > 0  # new values indeed
    for b in (9, 11, 13, 16):
        for n in (4, 5):
            out = call(b, n)
            assert out.masks.shape == (b, 1, H, W)
    prep, decode, upscale = (a - c for a, c in zip(caches(), before))
    assert (decode, upscale) == (0, 0), (decode, upscale)
    assert prep == 7  # 4 x 2 raw shapes, (11, 5) compiled before


# ---- (f) shape errors ---------------------------------------------------------------------------

def _bad_inputs(config):
    g = grid(config)
    c, lab = jnp.zeros((4, 2, 2)), jnp.ones((4, 2), jnp.int32)
    return [
        (dict(coords=jnp.zeros((4, 2))), dict(), r"labels must be given with coords"),
        (dict(coords=jnp.zeros((4, 2)), labels=lab), dict(), r"coords must be \(P, N, 2\), "
         r"got \(4, 2\)"),
        (dict(coords=jnp.zeros((4, 2, 3)), labels=lab), dict(), r"coords must be \(P, N, 2\)"),
        (dict(coords=c, labels=jnp.ones((4, 3), jnp.int32)), dict(),
         r"labels must be \(P, N\) = \(4, 2\).*got \(4, 3\)"),
        (dict(coords=c, labels=jnp.ones((4, 2))), dict(), r"labels must be integers.*float32"),
        (dict(labels=lab), dict(), r"labels given without coords"),
        (dict(), dict(), r"no prompt given"),
        (dict(), dict(boxes=jnp.zeros((4, 2, 2))), r"boxes must be \(P, 4\) XYXY, got"),
        (dict(), dict(mask_inputs=jnp.zeros((4, 1, 64, 64))),
         rf"mask_inputs must be \(P, 1, {g}, {g}\).*got \(4, 1, 64, 64\)"),
        (dict(), dict(mask_inputs=jnp.zeros((4, g, g))), r"mask_inputs must be \(P, 1,"),
        (dict(coords=c, labels=lab), dict(boxes=jnp.zeros((3, 4))),
         r"disagree on the number of prompts P: \{'coords': 4, 'boxes': 3\}"),
        (dict(coords=c, labels=lab), dict(image_index=jnp.zeros((3,), jnp.int32)),
         r"image_index must be \(4,\) integers"),
        (dict(coords=c, labels=lab), dict(input_size=(10, 20)),
         r"both input_size and original_size"),
        (dict(coords=c, labels=lab), dict(return_logits=True), r"return_logits asks for"),
    ]


def test_bad_shapes_raise_before_tracing(predictor):
    cfg = predictor.model.config
    caches = lambda: (device_predict.device_prompt_batch._cache_size(),  # noqa: E731
                      inference.decode_shown._cache_size())
    before = caches()
    for prompt_args, kwargs, match in _bad_inputs(cfg):
        with pytest.raises(ValueError, match=match):
            predict_on_device(predictor.model.variables, predictor.features, **prompt_args,
                              config=cfg, **kwargs)
    two = jnp.concatenate([predictor.features] * 2)
    with pytest.raises(ValueError, match=r"2 image embeddings given: image_index"):
        predict_on_device(predictor.model.variables, two, boxes=jnp.zeros((1, 4)), config=cfg)
    with pytest.raises(ValueError, match=r"embeddings must be \(N_img, 8, 8, C\)"):
        predict_on_device(predictor.model.variables, predictor.features[0],
                          boxes=jnp.zeros((1, 4)), config=cfg)
    with pytest.raises(ValueError, match=r"mesh must have a 'data' axis"):
        predict_on_device(predictor.model.variables, predictor.features,
                          boxes=jnp.zeros((1, 4)), config=cfg,
                          mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("batch",)))
    assert caches() == before, "an invalid call was traced"
    with pytest.raises(RuntimeError, match=r"set_image"):
        sam_jax.SamPredictor(predictor.model).predict_jax(boxes=jnp.zeros((1, 4)))
