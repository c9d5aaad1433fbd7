"""The annotation store of `sam-jax annotate` (issue 13's storage): SA-1B files that decode to
the accepted masks, unique ids after removals, two writers merging instead of overwriting, a
writer killed mid-stream losing nothing it acknowledged, and image names that never leave the
images folder."""

import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from sam_jax import sa1b
from sam_jax.annotate.store import META, AnnotationStore, StoreError

H, W = 30, 40


def _folder(tmp_path, names=("a.jpg", "b.png")):
    images = tmp_path / "images"
    images.mkdir()
    for name in names:
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(images / name)
    return str(images), str(tmp_path / "out")


def _mask(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_accepted_objects_are_an_sa1b_file_that_decodes_to_them(tmp_path):
    store = AnnotationStore(*_folder(tmp_path))
    first = store.add_object("a.jpg", _mask(2, 10, 3, 20), prompts={"points": [[5, 5]],
                             "labels": [1]}, predicted_iou=0.91, label="cup",
                             annotator="ann1", seconds=12.5)
    store.add_object("a.jpg", _mask(15, 28, 5, 9), prompts={"box": [5, 15, 9, 28]},
                     predicted_iou=0.8, annotator="ann2", seconds=3.0, source="automatic")
    path = os.path.join(store.out_dir, "a.json")
    image, masks = sa1b.load_masks(path)
    assert (image["width"], image["height"], image["file_name"]) == (W, H, "a.jpg")
    np.testing.assert_array_equal(masks, [_mask(2, 10, 3, 20), _mask(15, 28, 5, 9)])
    record = json.loads(open(path).read())
    ann = record["annotations"][0]
    assert ann["object_id"] == first["object_id"] and ann["label"] == "cup"
    assert ann["bbox"] == [3.0, 2.0, 16.0, 7.0] and ann["area"] == 8 * 17
    assert ann["point_coords"] == [[5.0, 5.0]] and ann["prompts"]["labels"] == [1]
    assert record["annotations"][1]["source"] == "automatic"
    assert record[META]["seconds"] == 15.5 and record[META]["annotators"] == ["ann1", "ann2"]
    assert [r["objects"] for r in store.progress()] == [2, 0]


def test_ids_stay_unique_after_removal_and_done_flag(tmp_path):
    store = AnnotationStore(*_folder(tmp_path))
    objs = [store.add_object("b.png", _mask(i, i + 3, 0, 5), prompts={}, predicted_iou=0.5)
            for i in range(3)]
    store.remove_object("b.png", objs[1]["object_id"])
    new = store.add_object("b.png", _mask(20, 25, 0, 5), prompts={}, predicted_iou=0.5)
    ids = [a["id"] for a in store.read("b.png")["annotations"]]
    assert len(ids) == len(set(ids)) == 3 and new["id"] not in (objs[0]["id"], objs[2]["id"])
    with pytest.raises(StoreError, match="no object"):
        store.remove_object("b.png", objs[1]["object_id"])
    store.set_done("b.png", True, W, H, seconds=4.0)
    row = [r for r in store.progress() if r["name"] == "b.png"][0]
    assert row == {"name": "b.png", "objects": 3, "done": True, "seconds": 4.0}


def test_bad_masks_and_sizes_are_refused(tmp_path):
    store = AnnotationStore(*_folder(tmp_path))
    with pytest.raises(StoreError, match="empty"):
        store.add_object("a.jpg", np.zeros((H, W), bool), prompts={}, predicted_iou=0.5)
    with pytest.raises(StoreError, match="bool"):
        store.add_object("a.jpg", np.ones((H, W), np.uint8), prompts={}, predicted_iou=0.5)
    store.add_object("a.jpg", _mask(0, 5, 0, 5), prompts={}, predicted_iou=0.5)
    with pytest.raises(StoreError, match="40x30 image, this one is 41x30"):
        store.add_object("a.jpg", np.ones((H, W + 1), bool), prompts={}, predicted_iou=0.5)
    assert len(store.read("a.jpg")["annotations"]) == 1  # a refused change writes nothing


@pytest.mark.parametrize("name", ["../secret.jpg", "sub/a.jpg", "/etc/passwd", "..", ".", "",
                                  "a.jpg\0", "..\\a.jpg", "missing.jpg", "notes.txt",
                                  "./a.jpg", "images/../a.jpg"])
def test_image_names_never_leave_the_images_folder(tmp_path, name):
    images, out = _folder(tmp_path)
    (tmp_path / "images" / "notes.txt").write_text("x")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "secret.jpg")
    (tmp_path / "images" / "sub").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "sub" / "a.jpg")
    store = AnnotationStore(images, out)
    with pytest.raises(StoreError):
        store.image_path(name)
    with pytest.raises(StoreError):
        store.annotation_path(name)
    assert store.image_path("a.jpg") == os.path.join(store.images_dir, "a.jpg")
    # the list the tool shows: the folder's own image files, nothing below or beside it
    assert [r["name"] for r in store.progress()] == ["a.jpg", "b.png"]


def _add_many(images, out, tag, count):
    store = AnnotationStore(images, out)
    for i in range(count):
        store.add_object("a.jpg", _mask(i % 25, i % 25 + 3, 0, 5), prompts={},
                         predicted_iou=0.5, annotator=tag)


def test_two_writers_merge_instead_of_overwriting(tmp_path):
    """Two processes (two tabs, two servers) accepting objects on the same image at the same
    time: every object of both is in the file."""
    images, out = _folder(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(images, out, tag, 25)) for tag in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    record = AnnotationStore(images, out).read("a.jpg")
    tags = [a["annotator"] for a in record["annotations"]]
    assert tags.count("x") == 25 and tags.count("y") == 25
    assert len({a["id"] for a in record["annotations"]}) == 50


WRITER = """
import sys
import numpy as np
from sam_jax.annotate.store import AnnotationStore
store = AnnotationStore(sys.argv[1], sys.argv[2])
for i in range(100000):
    m = np.zeros((30, 40), bool)
    m[i % 25:i % 25 + 3, 0:5] = True
    ann = store.add_object("a.jpg", m, prompts={}, predicted_iou=0.5)
    print(ann["object_id"], flush=True)  # acknowledged: on disk
"""


def test_writer_killed_at_any_moment_loses_nothing_acknowledged(tmp_path):
    images, out = _folder(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    for delay in (0.5, 0.8, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, images, out],
                                stdout=subprocess.PIPE, text=True, env=env)
        # the kill's moment counts from the first acknowledged object, not from the start:
        # the imports take seconds more on a loaded machine (a fixed wait once killed the
        # writer before it had written anything)
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        first = proc.stdout.readline().strip() if ready else ""
        if not first:
            proc.kill()
        assert first, "the writer acknowledged nothing within 120 s"
        time.sleep(delay)  # writing
        proc.send_signal(signal.SIGKILL)
        acked = [first] + proc.communicate()[0].split()
        proc.wait()
        store = AnnotationStore(images, out)  # a restart: removes stale temporaries
        on_disk = {a["object_id"] for a in store.read("a.jpg")["annotations"]}
        assert set(acked) <= on_disk
        assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_annotations_folder_trains_as_it_is(tmp_path, capsys):
    """Model in the loop: what the tool writes is an SA-1B folder that `sam-jax train` reads
    (images in their own folder), here 2 steps of the tiny model on 2 real DAVIS frames."""
    import shutil

    from conftest import call

    davis = os.path.join(os.path.dirname(__file__), "data", "davis_mini", "JPEGImages", "480p")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(os.path.join(davis, "camel", "00000.jpg"), images / "camel.jpg")
    shutil.copy(os.path.join(davis, "cows", "00000.jpg"), images / "cows.jpg")
    store = AnnotationStore(str(images), str(tmp_path / "out"))
    for name in ("camel.jpg", "cows.jpg"):
        m = np.zeros((240, 427), bool)
        m[60:180, 100:300] = True
        store.add_object(name, m, prompts={"points": [[200, 120]], "labels": [1]},
                         predicted_iou=0.9)
    config = json.load(open(os.path.join(os.path.dirname(__file__), "..", "experiments",
                                         "configs", "finetune_annotations.json")))
    config.update(model="tiny", init_from="", workdir=str(tmp_path / "run"), steps=2,
                  batch_size=2, save_every=2, log_every=1, eval_every=0, eval_images=1)
    config["optim"] = {"preset": "tiny", "total_steps": 2, "decay_steps": [1],
                       "warmup_steps": 1}
    config["data"].update(root=store.out_dir, images_dir=str(images), validation_fraction=0.0,
                          max_masks=1, data_dir=str(tmp_path / "tfds"), worker_count=0)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    status, out, err = call(capsys, "train", "--config", path, "-q")
    assert status == 0, err
    assert "done: 2 steps" in out


def test_a_second_store_never_deletes_a_write_in_progress(tmp_path):
    """A store opened while another writes (a second server on the same folder) must not take
    the writer's temporary file for a killed writer's leftover (CI caught this race)."""
    import fcntl

    images, out = _folder(tmp_path)
    first = AnnotationStore(images, out)
    in_progress = os.path.join(first.out_dir, ".tmp-a-inflight.json")
    leftover = os.path.join(first.out_dir, ".tmp-b-killed.json")
    for path in (in_progress, leftover):
        open(path, "w").write("{")
    with open(os.path.join(first.out_dir, ".locks", "a.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # image a is being written
        AnnotationStore(images, out)
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert os.path.exists(in_progress) and not os.path.exists(leftover)
    AnnotationStore(images, out)  # once the writer is gone, its file is stale
    assert not os.path.exists(in_progress)
