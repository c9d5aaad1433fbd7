"""`sam-jax eval proposals | instances | edges | edges-benchmark` end to end on a tiny checkpoint
and synthetic COCO / BSDS-format data: each writes its JSON and PNG and prints its numbers;
the numbers are the library functions' (tested in test_eval_*.py) on the same inputs."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_error, call
from test_eval_proposals import H, W, synthetic_gt


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import sam_jax
    from random_weights import random_variables
    from sam_jax.checkpoints import save_converted

    cfg = sam_jax.tiny()
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_converted(random_variables(cfg, seed=3), cfg, path)
    return path


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """3 images and their LVIS-style ground truth (file names from coco_url)."""
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(root / f"im{i}.png")
    data = synthetic_gt()
    (root / "gt.json").write_text(json.dumps(data))
    return root, data


def test_proposals_command(checkpoint, coco, tmp_path, capsys):
    from sam_jax.evaluation.proposals import evaluate_proposals

    root, _ = coco
    out = tmp_path / "out"
    status, stdout, err = call(capsys, "eval", "proposals", "--coco", root / "gt.json",
                               "--images", root, "--points-per-side", "4", "--max-proposals",
                               "20", "--checkpoint", checkpoint, "-o", out, "-q")
    assert status == 0, err
    report = json.loads((out / "proposals.json").read_text())
    results = json.loads((out / "proposals_results.json").read_text())
    assert report["images"] == 3 and report["proposals"] == len(results)
    assert all(sum(r["image_id"] == i for r in results) <= 20 for i in (1, 2, 3))
    # the printed and saved numbers are pycocotools' on the saved proposals
    again = evaluate_proposals(str(root / "gt.json"), results, max_dets=(20, 100))
    assert report["results"]["AR@20"] == pytest.approx(again.ar("all", 20))
    assert "AR@20" in stdout
    assert Image.open(out / "proposals.png").size == (1200, 480)


def test_instances_command(checkpoint, coco, tmp_path, capsys):
    from sam_jax.evaluation.instances import evaluate_instances

    root, data = coco
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"],
                   "bbox": a["bbox"], "score": 0.9} for a in data["annotations"]]
    detections.append({"image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "score": 0.5})
    (tmp_path / "det.json").write_text(json.dumps(detections))
    out = tmp_path / "out"
    status, stdout, err = call(capsys, "eval", "instances", "--coco", root / "gt.json",
                               "--images", root, "--detections", tmp_path / "det.json",
                               "--checkpoint", checkpoint, "-o", out, "-q")
    assert status == 0, err
    assert "warning: skipped 1 detection" in err  # the zero-width box
    results = json.loads((out / "instances_results.json").read_text())
    assert len(results) == len(data["annotations"])
    report = json.loads((out / "instances.json").read_text())
    again = evaluate_instances(str(root / "gt.json"), results)
    assert report["results"]["AP"] == pytest.approx(again.ap)
    assert Image.open(out / "instances.png").size == (720, 480)
    assert_error(call(capsys, "eval", "instances", "--coco", root / "gt.json", "--images", root,
                      "--detections", root / "none.json", "-o", out), 1, "none.json")


def test_edges_command_writes_maps_and_benchmarks_them(checkpoint, tmp_path, capsys):
    from scipy.io import savemat

    images, truth = tmp_path / "images", tmp_path / "gt"
    images.mkdir()
    truth.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), np.uint8)).save(images / f"{name}.jpg")
        boundary = np.zeros((40, 56), np.uint8)
        boundary[20, 5:50] = 1
        seg = np.ones((40, 56), np.uint16)
        cell = np.empty((1, 1), dtype=object)
        cell[0, 0] = {"Segmentation": seg, "Boundaries": boundary}
        savemat(truth / f"{name}.mat", {"groundTruth": cell})
    out = tmp_path / "out"
    status, stdout, err = call(capsys, "eval", "edges", images, "--ground-truth", truth,
                               "--points-per-side", "4", "--checkpoint", checkpoint, "-o", out,
                               "-q")
    assert status == 0, err
    for name in ("a", "b"):
        edge = Image.open(out / "edges" / f"{name}.png")
        assert edge.mode == "L" and edge.size == (56, 40)
    report = json.loads((out / "edges_benchmark.json").read_text())
    assert stdout.startswith("ODS ") and f"{report['ods']['f']:.3f}" in stdout
    # the benchmark alone on the written maps prints the same line
    status, again, err = call(capsys, "eval", "edges-benchmark", out / "edges", truth, "-q")
    assert status == 0, err
    assert again == stdout
    assert_error(call(capsys, "eval", "edges-benchmark", out / "edges", tmp_path / "none"), 1,
                 "none")
