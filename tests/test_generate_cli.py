"""`sam-jax generate` end to end on real images (tiny model, converted through the real .pth
path), SA-1B files checked with pycocotools, resume after SIGKILL, and the SA-1B reader on a
released SA-1B record."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, load_truck
from sam_jax import cli, sa1b
from sam_jax.utils import amg

FAST = ["--model-type", "tiny", "--points-per-side", "6", "--pred-iou-thresh", "0",
        "--stability-score-thresh", "0", "--box-nms-thresh", "0.98", "-q"]
SA1B_SAMPLE = os.path.join(os.path.dirname(__file__), "data", "sa_226381_subset12.json")


@pytest.fixture(scope="module")
def checkpoint(tiny_official, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen_ckpt") / "tiny.pth"
    torch.save(tiny_official.state_dict(), path)
    return str(path)


def _folder(path, sizes):
    path.mkdir()
    for i, size in enumerate(sizes):
        Image.fromarray(load_truck(size)).save(path / f"img{i}.jpg", quality=95)
    return path


def test_generate_folder_writes_sa1b_that_pycocotools_decodes(checkpoint, tmp_path, capsys):
    from pycocotools import mask as mask_utils
    images = _folder(tmp_path / "in", [(300, 200), (160, 240)])
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    status = cli.main(["generate", str(images), "--checkpoint", checkpoint, "-o", str(out),
                       "--visualize"] + FAST)
    assert status == 1  # the broken image was skipped, and said so
    err = capsys.readouterr().err
    assert "skipping an image" in err and "broken.png" in err
    assert sorted(os.listdir(out)) == ["img0.json", "img0.png", "img1.json", "img1.png"]
    for name, (w, h) in (("img0", (300, 200)), ("img1", (160, 240))):
        data = json.load(open(out / f"{name}.json"))
        assert data["image"] == {"image_id": sa1b.image_id_for(f"{name}.jpg"), "width": w,
                                 "height": h, "file_name": f"{name}.jpg"}
        assert len(data["annotations"]) > 0
        ids = [a["id"] for a in data["annotations"]]
        assert len(set(ids)) == len(ids)
        for ann in data["annotations"]:
            assert list(ann) == ["bbox", "area", "segmentation", "predicted_iou",
                                 "point_coords", "crop_box", "id", "stability_score"]
            rle = {"size": ann["segmentation"]["size"],
                   "counts": ann["segmentation"]["counts"].encode()}
            mask = mask_utils.decode(rle).astype(bool)
            assert mask.shape == (h, w) and ann["area"] == int(mask.sum()) == \
                int(mask_utils.area(rle))
            if ann["area"]:
                x, y, bw, bh = mask_utils.toBbox(rle).tolist()
                assert ann["bbox"] == [x, y, bw - 1, bh - 1]  # SA-1B's convention
            assert ann["crop_box"] == [0.0, 0.0, float(w), float(h)]
        drawn = np.asarray(Image.open(out / f"{name}.png"))
        assert drawn.shape == (h, w, 3)


def test_rerun_skips_finished_images(checkpoint, tmp_path, capsys):
    images = _folder(tmp_path / "in", [(120, 90)])
    out = tmp_path / "out"
    assert cli.main(["generate", str(images), "--checkpoint", checkpoint, "-o", str(out)]
                    + FAST) == 0
    before = os.stat(out / "img0.json").st_mtime_ns
    capsys.readouterr()
    assert cli.main(["generate", str(images), "--checkpoint", checkpoint, "-o", str(out)]
                    + FAST) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert os.stat(out / "img0.json").st_mtime_ns == before


def test_bfloat16_compute(checkpoint, tmp_path):
    images = _folder(tmp_path / "in", [(120, 90)])
    out = tmp_path / "out"
    assert cli.main(["generate", str(images / "img0.jpg"), "--checkpoint", checkpoint, "-o",
                     str(out), "--compute-dtype", "bfloat16"] + FAST) == 0
    data = sa1b.read_sa1b(str(out / "img0.json"))
    assert data["annotations"] and data["image"]["width"] == 120


def test_killed_run_resumes_without_duplicates_or_broken_files(checkpoint, tmp_path):
    images = _folder(tmp_path / "in", [(240, 160)] * 6)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sam_jax", "generate", str(images), "--checkpoint",
           checkpoint, "-o", str(out)] + FAST
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and any(n.endswith(".json") and not n.startswith(".")
                                for n in os.listdir(out)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {n for n in os.listdir(out) if not n.startswith(".")}
    assert 1 <= len(done_before) < 6
    for name in done_before:  # whatever the kill left is whole
        sa1b.read_sa1b(str(out / name))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"wrote {6 - len(done_before)} SA-1B JSON file(s)" in result.stdout  # only the rest
    assert sorted(os.listdir(out)) == [f"img{i}.json" for i in range(6)]  # no temporaries
    for i in range(6):
        data = sa1b.read_sa1b(str(out / f"img{i}.json"))
        assert data["image"]["file_name"] == f"img{i}.jpg" and data["annotations"]


@pytest.mark.parametrize("argv, match", [
    (["generate", "nowhere.jpg"], "nowhere.jpg: no such file or folder"),
    (["generate", "{empty}"], "no image files"),
    (["generate", "{in}", "--points-per-batch", "0"], "points_per_batch must be >= 1"),
])
def test_generate_errors(checkpoint, tmp_path, capsys, argv, match):
    (tmp_path / "empty").mkdir()
    _folder(tmp_path / "in", [(64, 48)])
    argv = [a.format(empty=tmp_path / "empty", **{"in": tmp_path / "in"}) for a in argv]
    status = cli.main(argv + ["--checkpoint", checkpoint, "-o", str(tmp_path / "o"), "-q",
                              "--model-type", "tiny"])
    err = capsys.readouterr().err
    assert status != 0 and match in err and "Traceback" not in err


def test_read_released_sa1b_record():
    from pycocotools import mask as mask_utils
    image, masks = sa1b.load_masks(SA1B_SAMPLE)
    assert image == {"image_id": 226381, "width": 2000, "height": 1500,
                     "file_name": "sa_226381.jpg"}
    data = sa1b.read_sa1b(SA1B_SAMPLE)
    assert masks.shape == (12, 1500, 2000)
    for ann, mask in zip(data["annotations"], masks):
        assert ann["area"] == int(mask.sum())
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
        x, y, w, h = mask_utils.toBbox(rle).tolist()
        assert ann["bbox"] == [x, y, w - 1, h - 1]
        # our writer reproduces the released record from the decoded mask
        record = {"segmentation": amg.coco_encode_rle(amg.mask_to_rle(mask[None])[0]),
                  "bbox": ann["bbox"], "area": ann["area"],
                  "predicted_iou": ann["predicted_iou"], "point_coords": ann["point_coords"],
                  "crop_box": ann["crop_box"], "stability_score": ann["stability_score"]}
        ours = sa1b.to_sa1b([record], "sa_226381.jpg", 2000, 1500)["annotations"][0]
        assert {k: v for k, v in ours.items() if k != "id"} == \
            {k: v for k, v in ann.items() if k != "id"}


def test_bad_sa1b_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(sa1b.SA1BFormatError, match="not valid JSON"):
        sa1b.read_sa1b(str(bad))
    bad.write_text(json.dumps({"image": {"image_id": 1, "width": 4, "height": 3,
                                         "file_name": "x.jpg"},
                               "annotations": [{"segmentation": {"size": [4, 3],
                                                                 "counts": "3"}}]}))
    with pytest.raises(sa1b.SA1BFormatError, match="has size"):
        sa1b.read_sa1b(str(bad))
