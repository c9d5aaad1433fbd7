"""Shared test setup: float32-exact matmuls (parity tolerances assume them), import paths, and
session fixtures for the tiny model (official PyTorch and ours, with the same weights)."""

import os
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")
# the suite stays hermetic: `sam_jax.load` and the CLI would otherwise write compiled
# executables into the user's cache (tests/test_compilation_cache.py turns it on itself)
os.environ.setdefault("SAM_JAX_NO_COMPILATION_CACHE", "1")

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
for _path in (REPO, TESTS):  # `import sam_jax` and `import official` without PYTHONPATH
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TRUCK = os.path.join(REPO, "assets", "truck.jpg")


def load_truck(size=None) -> np.ndarray:
    """assets/truck.jpg (1800x1200) as HxWx3 uint8 RGB, optionally resized to size=(W, H)."""
    from PIL import Image
    image = Image.open(TRUCK).convert("RGB")
    if size is not None and tuple(size) != image.size:
        image = image.resize(tuple(size), Image.BILINEAR)
    return np.asarray(image)


def perturbed(params, seed, scale=0.3):
    """`params` with every leaf replaced by seeded normal noise times `scale`: a trained-looking
    layer where a fresh one would start at zero and hide its path."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves)])


def assert_generator_masks_are_predictor_masks(model, image, points_per_side=3):
    """Every mask the automatic generator keeps (no filtering) is, within IoU 0.99, one of the
    predictor's masks for the record's own point: both paths refine the same way."""
    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
    from sam_jax.predictor import SamPredictor

    gen = SamAutomaticMaskGenerator(model, points_per_side=points_per_side,
                                    pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                    box_nms_thresh=1.0)
    records = gen.generate(image)
    assert len(records) >= 3
    predictor = SamPredictor(model)
    predictor.set_image(image)
    for r in records:
        assert r["segmentation"].shape == image.shape[:2]
        masks, _, _ = predictor.predict(np.array(r["point_coords"]), np.array([1]))
        ious = [(m & r["segmentation"]).sum() / max((m | r["segmentation"]).sum(), 1)
                for m in masks]
        assert max(ious) > 0.99, (r["point_coords"], ious)


def call(capsys, *args):
    """`sam_jax.cli.main(args)` in-process -> (status, stdout, stderr)."""
    from sam_jax import cli

    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_error(result, status, *words):
    """A CLI failure reported as exactly one `sam-jax: error:` line naming `words`."""
    code, out, err = result
    assert code == status, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    errors = [line for line in err.splitlines() if line.startswith("sam-jax: error: ")]
    assert len(errors) == 1, err
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """After each test module, drop JAX's compiled executables. Each XLA:CPU executable keeps
    memory mappings (3 training modules left ~5,000), so over the whole suite one process can
    near the kernel's limit of 65,530 (vm.max_map_count): the likely cause of the clean-clone
    CI twice dying with a segmentation fault inside an XLA compile late in the run, in modules
    that pass alone. Clearing returns the count to ~800; later modules compile again."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_config():
    import sam_jax
    return sam_jax.tiny()


@pytest.fixture(scope="session")
def tiny_official(tiny_config):
    """The official model for the tiny config, seeded and perturbed (no exact zeros/ones)."""
    pytest.importorskip("torch")
    pytest.importorskip("segment_anything")
    import official
    return official.seeded_official(tiny_config, seed=0)


@pytest.fixture(scope="session")
def tiny_sam(tiny_official, tiny_config, tmp_path_factory):
    """Our model with the official tiny model's weights, via torch.save + sam_jax.load."""
    import official
    return official.save_and_load(tiny_official, tmp_path_factory.mktemp("tiny_ckpt"),
                                  config=tiny_config)
