"""Tests for checkpoint reading (torch-free, restricted), conversion and Orbax round trips.

Uses the official `segment_anything` package and torch only to *write* reference checkpoints;
reading is tested with torch absent too. Everything runs on tiny configs except the full-size
key/shape checks, which build the official models on torch's "meta" device (no memory).
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import jax
import numpy as np
import pytest

from sam_jax import configs
from sam_jax.checkpoints import (CheckpointError, convert_checkpoint, load_converted,
                                 load_variables, read_checkpoint, save_converted)
from sam_jax.checkpoints.convert import (convert_state_dict, detect_model_type, hf_to_official,
                                         torch_layout)
from sam_jax.checkpoints.pth import load_pth

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")
from official import official_sam  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomized(model, seed=0):
    """Random values everywhere (the default init has exact zeros and ones, which would hide
    swapped or transposed tensors)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn_like(t))
    return model


def to_numpy(sd):
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in sd.items()}


def assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope="module")
def tiny():
    return configs.tiny()


@pytest.fixture(scope="module")
def tiny_pth(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(randomized(official_sam(tiny)).state_dict(), path)
    return str(path)


def layout_state_dict(config, seed=0):
    """A random state dict with exactly the keys and shapes the Flax model expects."""
    from sam_jax.build_sam import abstract_variables
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s.torch_shape).astype(np.float32)
            for k, s in torch_layout(abstract_variables(config)).items()}


# ---- the torch-free reader ----------------------------------------------------------------

def test_reader_matches_torch_load(tmp_path):
    base = torch.randn(6, 10)
    sd = {
        "transposed": base.t(),                    # non-contiguous
        "offset_view": base[2:, 3:7],              # offset + strides into a shared storage
        "fp16": torch.randn(3, 4).half(),
        "bf16": torch.randn(5).bfloat16(),
        "int64": torch.arange(7),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(4, 2)),
        "expanded": torch.randn(3, 1).expand(3, 4),  # stride 0
    }
    path = tmp_path / "x.pth"
    torch.save(sd, path)
    ours, ref = load_pth(path), torch.load(path, weights_only=True, map_location="cpu")
    assert list(ours) == list(ref)
    for key, tensor in ref.items():
        assert ours[key].shape == tuple(tensor.shape), key
        assert ours[key].dtype.name == str(tensor.dtype).replace("torch.", ""), key
        np.testing.assert_array_equal(ours[key].astype(np.float64),
                                      tensor.detach().double().numpy(), err_msg=key)


def test_reader_unwraps_and_reads_model_key(tmp_path, tiny_pth):
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": torch.load(tiny_pth, weights_only=True), "epoch": 3}, wrapped)
    sd, kind = read_checkpoint(wrapped)
    assert kind == "pth:official"
    assert sd.keys() == load_pth(tiny_pth).keys()


def test_conversion_without_torch(tiny, tiny_pth, tmp_path):
    """Convert in a fresh interpreter where `import torch` fails; same arrays as here."""
    out = tmp_path / "no_torch.npz"
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import jax, numpy as np
        from sam_jax import configs
        from sam_jax.checkpoints import read_checkpoint
        from sam_jax.checkpoints.convert import convert_state_dict
        sd, kind = read_checkpoint({tiny_pth!r})
        assert kind == "pth:official", kind
        v = convert_state_dict(sd, configs.tiny(), {tiny_pth!r})
        flat = {{jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(v)[0]}}
        np.savez({str(out)!r}, **flat)
        print("torch usable:", sys.modules["torch"] is not None)
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch usable: False" in result.stdout
    expected = convert_state_dict(to_numpy(torch.load(tiny_pth, weights_only=True)), tiny)
    flat = {jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    with np.load(out) as got:
        assert sorted(got.files) == sorted(flat)
        for key, value in flat.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _write_pth(path, pickle_bytes):
    """A torch-style zip archive around arbitrary pickle bytes."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("func_name", ["os.system", "builtins.exec"])
def test_malicious_pickle_is_refused(tmp_path, func_name):
    marker = tmp_path / "pwned"
    func = {"os.system": os.system, "builtins.exec": exec}[func_name]
    arg = f"touch {marker}" if func_name == "os.system" else f"open({str(marker)!r}, 'w')"
    payload = pickle.dumps({"image_encoder.pos_embed": _Evil(func, arg)}, protocol=2)
    path = tmp_path / "evil.pth"
    _write_pth(path, payload)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    name = func.__name__  # os.system pickles as posix.system
    assert f".{name}" in str(err.value) and "evil.pth" in str(err.value)
    assert "refusing" in str(err.value)
    assert not marker.exists()


def test_bad_files_are_refused(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="legacy"):
        read_checkpoint(legacy)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_checkpoint(junk)
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        read_checkpoint(junk_st)
    with pytest.raises(CheckpointError, match="extension"):
        read_checkpoint(junk.rename(tmp_path / "junk.npy"))
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "absent.pth")


def test_out_of_bounds_view_is_refused(tmp_path):
    """A hostile tensor view reaching past its storage must not read foreign memory."""
    path = tmp_path / "oob.pth"
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    root = next(n for n in files if n.endswith("/data.pkl"))
    # The size tuple (4,) pickles as BININT1 4, TUPLE1; make it (255,) over a 4-float storage.
    assert files[root].count(b"K\x04\x85") == 1
    files[root] = files[root].replace(b"K\x04\x85", b"K\xff\x85")
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    with pytest.raises(CheckpointError, match="oob.pth: tensor view .* storage of 4"):
        load_pth(path)


# ---- conversion -----------------------------------------------------------------------------

def test_tiny_official_keys_match_flax_tree(tiny):
    """The contract: every official state-dict key has exactly one Flax slot, same shape."""
    from sam_jax.build_sam import abstract_variables
    layout = torch_layout(abstract_variables(tiny))
    official = {k: tuple(v.shape) for k, v in official_sam(tiny).state_dict().items()}
    assert sorted(set(official) - set(layout)) == [], "official keys the Flax model lacks"
    assert sorted(set(layout) - set(official)) == [], "Flax leaves the official model lacks"
    assert {k: s.torch_shape for k, s in layout.items()} == official


def test_conversion_rules(tiny, tiny_pth):
    sd = load_pth(tiny_pth)
    v = convert_state_dict(sd, tiny, tiny_pth)
    p = v["params"]
    np.testing.assert_array_equal(p["image_encoder"]["blocks.1"]["attn"]["qkv"]["kernel"],
                                  sd["image_encoder.blocks.1.attn.qkv.weight"].T)
    np.testing.assert_array_equal(p["image_encoder"]["neck.2"]["kernel"],
                                  sd["image_encoder.neck.2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        p["mask_decoder"]["output_upscaling.0"]["kernel"],
        sd["mask_decoder.output_upscaling.0.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(p["prompt_encoder"]["point_embeddings.2"]["embedding"],
                                  sd["prompt_encoder.point_embeddings.2.weight"])
    np.testing.assert_array_equal(p["image_encoder"]["neck.1"]["scale"],
                                  sd["image_encoder.neck.1.weight"])
    np.testing.assert_array_equal(
        v["buffers"]["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"],
        sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    assert "pe_layer" not in p["prompt_encoder"]  # the buffer is not trainable
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(v))


def test_strict_missing_key(tiny):
    sd = layout_state_dict(tiny)
    del sd["mask_decoder.iou_token.weight"], sd["image_encoder.blocks.0.attn.rel_pos_h"]
    with pytest.raises(CheckpointError) as err:
        convert_state_dict(sd, tiny, "some.pth")
    msg = str(err.value)
    assert "some.pth" in msg and "missing keys (2)" in msg
    assert "mask_decoder.iou_token.weight" in msg and "blocks.0.attn.rel_pos_h" in msg


def test_strict_unused_key(tiny):
    sd = layout_state_dict(tiny)
    sd["image_encoder.blocks.7.norm1.weight"] = np.ones(32, np.float32)
    with pytest.raises(CheckpointError, match=r"unused keys \(1\)") as err:
        convert_state_dict(sd, tiny)
    assert "image_encoder.blocks.7.norm1.weight" in str(err.value)


def test_strict_wrong_shape(tiny):
    sd = layout_state_dict(tiny)
    sd["image_encoder.neck.0.weight"] = np.zeros((32, 32, 3, 3), np.float32)
    sd["image_encoder.pos_embed"] = np.zeros((1, 4, 4, 32), np.float32)
    with pytest.raises(CheckpointError) as err:
        convert_state_dict(sd, tiny)
    msg = str(err.value)
    assert "image_encoder.neck.0.weight: expected (32, 32, 1, 1), got (32, 32, 3, 3)" in msg
    assert "image_encoder.pos_embed: expected (1, 8, 8, 32), got (1, 4, 4, 32)" in msg


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_full_size_detection_and_layout(model_type):
    """Full-size official models, built on torch's meta device: only keys and shapes."""
    from segment_anything import sam_model_registry
    from sam_jax.build_sam import abstract_variables
    with torch.device("meta"):
        sd = sam_model_registry[model_type]().state_dict()
    assert detect_model_type(sd) == model_type
    layout = torch_layout(abstract_variables(configs.get_config(model_type)))
    assert {k: s.torch_shape for k, s in layout.items()} == {k: tuple(v.shape)
                                                             for k, v in sd.items()}


def test_detection_refuses_unknown_sizes(tiny, tiny_pth):
    with pytest.raises(CheckpointError, match="explicit config"):
        detect_model_type(load_pth(tiny_pth), tiny_pth)


# ---- Hugging Face layout --------------------------------------------------------------------

def _hf_model(config):
    transformers = pytest.importorskip("transformers")
    e, p, d = config.image_encoder, config.prompt_encoder, config.mask_decoder
    hf_config = transformers.SamConfig(
        vision_config=dict(hidden_size=e.embed_dim, num_hidden_layers=e.depth,
                           num_attention_heads=e.num_heads, image_size=e.img_size,
                           patch_size=e.patch_size, output_channels=e.out_chans,
                           window_size=e.window_size,
                           global_attn_indexes=list(e.global_attn_indexes),
                           mlp_dim=int(e.embed_dim * e.mlp_ratio),
                           num_pos_feats=p.embed_dim // 2),
        prompt_encoder_config=dict(hidden_size=p.embed_dim, image_size=e.img_size,
                                   patch_size=e.patch_size, mask_input_channels=p.mask_in_chans),
        mask_decoder_config=dict(hidden_size=d.transformer_dim,
                                 num_attention_heads=d.transformer_num_heads,
                                 mlp_dim=d.transformer_mlp_dim,
                                 num_hidden_layers=d.transformer_depth,
                                 iou_head_depth=d.iou_head_depth,
                                 iou_head_hidden_dim=d.iou_head_hidden_dim))
    torch.manual_seed(1)
    model = transformers.SamModel(hf_config).eval()
    with torch.no_grad():
        for t in model.parameters():
            t.add_(0.1 * torch.randn_like(t))
    return model


def test_hf_safetensors_layout(tiny, tmp_path):
    """An HF SamModel saved as safetensors reads into an official state dict under which the
    official model computes what the HF model computes (so names *and* meanings match), and
    converts to the same variables as that official state dict."""
    hf = _hf_model(tiny)
    hf.save_pretrained(tmp_path / "hf")
    sd, kind = read_checkpoint(tmp_path / "hf" / "model.safetensors")
    assert kind == "safetensors:hf"
    official = official_sam(tiny)
    official.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    torch.manual_seed(2)
    image = torch.randn(1, 3, tiny.image_size, tiny.image_size)
    points, labels = torch.tensor([[[20.0, 30.0], [90.0, 70.0]]]), torch.tensor([[1, 0]])
    with torch.no_grad():
        sparse, dense = official.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        masks, iou = official.mask_decoder(official.image_encoder(image),
                                           official.prompt_encoder.get_dense_pe(), sparse, dense,
                                           multimask_output=True)
        out = hf(pixel_values=image, input_points=points[:, None], input_labels=labels[:, None],
                 multimask_output=True)
    np.testing.assert_allclose(masks.numpy(), out.pred_masks[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(iou.numpy(), out.iou_scores[:, 0].numpy(), atol=1e-5)
    assert_trees_equal(convert_state_dict(sd, tiny),
                       convert_state_dict(to_numpy(official.state_dict()), tiny))


def test_hf_tied_copies_and_unknown_keys(tiny):
    hf_sd = to_numpy(_hf_model(tiny).state_dict())
    assert "prompt_encoder.shared_embedding.positional_embedding" in hf_sd
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in hf_to_official(hf_sd)
    bad = dict(hf_sd)
    bad["prompt_encoder.shared_embedding.positional_embedding"] = (
        bad["shared_image_embedding.positional_embedding"] + 1)
    with pytest.raises(CheckpointError, match="tied"):
        hf_to_official(bad, "hf.safetensors")
    bad = dict(hf_sd, **{"vision_encoder.extra.weight": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError, match=r"unknown keys \(1\)") as err:
        hf_to_official(bad, "hf.safetensors")
    assert "vision_encoder.extra.weight" in str(err.value)


# ---- Orbax round trip and dispatch ----------------------------------------------------------

def test_orbax_round_trip_and_overwrite(tiny, tmp_path):
    variables = convert_state_dict(layout_state_dict(tiny), tiny)
    out = tmp_path / "converted"
    save_converted(variables, tiny, out, metadata={"model_type": "tiny", "source": "test"})
    config, restored = load_converted(out)
    assert config == tiny
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    assert_trees_equal(jax.tree.map(np.asarray, restored), variables)
    info = json.loads((out / "config.json").read_text())
    assert info["model_type"] == "tiny" and info["source"] == "test"

    with pytest.raises(CheckpointError, match="not empty"):
        save_converted(variables, tiny, out)
    (out / "notes.txt").write_text("mine")
    other = convert_state_dict(layout_state_dict(tiny, seed=1), tiny)
    save_converted(other, tiny, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # nothing the user wrote is lost
    assert_trees_equal(jax.tree.map(np.asarray, load_converted(out)[1]), other)

    user_dir = tmp_path / "user"
    (user_dir / "variables").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not an Orbax checkpoint"):
        save_converted(variables, tiny, user_dir, overwrite=True)


def test_load_converted_checks_tree(tiny, tmp_path):
    out = tmp_path / "converted"
    save_converted(convert_state_dict(layout_state_dict(tiny), tiny), tiny, out)
    info = json.loads((out / "config.json").read_text())
    info["image_encoder"]["depth"] = 3
    info["image_encoder"]["global_attn_indexes"] = [2]
    (out / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="missing: params/image_encoder/blocks.2"):
        load_converted(out)


def test_convert_checkpoint_and_load_variables(tiny, tiny_pth, tmp_path):
    out = tmp_path / "converted"
    convert_checkpoint(tiny_pth, out, config=tiny)
    info = json.loads((out / "config.json").read_text())
    assert info["source"] == "pth:official:sam_tiny.pth"
    with pytest.raises(CheckpointError, match="not empty"):
        convert_checkpoint(tiny_pth, out, config=tiny)
    expected = convert_state_dict(load_pth(tiny_pth), tiny)
    for path, kwargs in [(out, {}), (tiny_pth, {"config": tiny})]:
        config, variables = load_variables(path, **kwargs)
        assert config == tiny
        assert_trees_equal(jax.tree.map(np.asarray, variables), expected)
    with pytest.raises(CheckpointError, match="neither"):
        load_variables(tmp_path)
    with pytest.raises(CheckpointError, match="explicit config"):
        load_variables(tiny_pth)
