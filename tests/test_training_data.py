"""The training data pipeline: tfds builders (prepared and read back without TensorFlow),
example preprocessing and the deterministic host-sharded loader (Grain, in worker processes or
in this one), on tiny synthetic folders."""

import io
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from sam_jax import sa1b
from sam_jax.training import data, datasets
from sam_jax.utils.transforms import ResizeLongestSide

SA1B_JSON = os.path.join(os.path.dirname(__file__), "data", "sa_226381_subset12.json")
H, W = 40, 64


def _sa1b_record():
    with open(SA1B_JSON) as f:
        return json.load(f)


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _write_image(path, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (H, W, 3), np.uint8)
    im = Image.fromarray(pixels).convert(mode)
    im.save(path)


def _davis(root):
    """Groups a (0/255 masks), b (palette: two objects), c (gray levels 100/200: two objects),
    three frames each; frame 2 of a has an empty mask (skipped). Returns {(group, frame):
    masks (N, H, W) in value order}."""
    written = {}
    for g in "abc":
        os.makedirs(root / "JPEGImages" / "480p" / g)
        os.makedirs(root / "Annotations" / "480p" / g)
        for f in range(3):
            name = f"{f:05d}"
            _write_image(root / "JPEGImages" / "480p" / g / f"{name}.jpg", hash((g, f)) % 1000,
                         mode="L" if g == "b" else "RGB")
            one = _rect(H, W, 2 + f, 20, 3, 30 + f)
            two = _rect(H, W, 25, 38, 40, 60)
            label = np.zeros((H, W), np.uint8)
            mask_path = root / "Annotations" / "480p" / g / f"{name}.png"
            if g == "a":
                if f == 2:
                    Image.fromarray(label).save(mask_path)
                    continue
                label[one] = 255
                Image.fromarray(label).save(mask_path)
                written[(g, name)] = one[None]
            else:
                label[one], label[two] = (1, 2) if g == "b" else (100, 200)
                im = Image.fromarray(label)
                if g == "b":
                    im = im.convert("P")
                    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
                im.save(mask_path)
                written[(g, name)] = np.stack([one, two])
    return written


def _read_all(source):
    return {(info["group"], info["name"]): (image, masks, info)
            for image, masks, info in data.eval_examples(source)}


def test_image_mask_folder_round_trip(tmp_path):
    written = _davis(tmp_path / "davis")
    out = tmp_path / "tfds"
    builder = datasets.prepare_image_mask_folder(tmp_path / "davis", out, holdout_groups=["c"])
    train = _read_all(datasets.load_source(builder, "train"))
    val = _read_all(datasets.load_source(str(out), "validation"))  # from the folder alone
    assert "tensorflow" not in sys.modules
    assert sorted(train) == sorted(k for k in written if k[0] != "c")
    assert sorted(val) == sorted(k for k in written if k[0] == "c")
    assert not {g for g, _ in train} & {"c"}
    for key, (image, masks, info) in {**train, **val}.items():
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        assert masks.dtype == bool
        np.testing.assert_array_equal(masks, written[key])
    assert list(val[("c", "00000")][2]["mask_ids"]) == [100, 200]
    assert list(train[("b", "00001")][2]["mask_ids"]) == [1, 2]
    # preparing again with the same inputs reuses it; different held-out groups is an error
    datasets.prepare_image_mask_folder(tmp_path / "davis", out, holdout_groups=["c"])
    with pytest.raises(ValueError, match="overwrite"):
        datasets.prepare_image_mask_folder(tmp_path / "davis", out, holdout_groups=["b"])
    rebuilt = datasets.prepare_image_mask_folder(tmp_path / "davis", out, holdout_groups=["b"],
                                                 overwrite=True)
    assert {g for g, _ in _read_all(datasets.load_source(rebuilt, "validation"))} == {"b"}
    with pytest.raises(ValueError, match="not in"):
        datasets.prepare_image_mask_folder(tmp_path / "davis", tmp_path / "x",
                                           holdout_groups=["nope"])


def test_plain_layout_and_unreadable_image(tmp_path):
    root = tmp_path / "plain"
    os.makedirs(root / "images" / "g")
    os.makedirs(root / "masks" / "g")
    _write_image(root / "images" / "g" / "x.png", 0, mode="RGBA")
    Image.fromarray(_rect(H, W, 1, 5, 1, 5).astype(np.uint8) * 255).save(
        root / "masks" / "g" / "x.png")
    source = datasets.load_source(datasets.prepare_image_mask_folder(root, tmp_path / "o"))
    (image, masks, info), = data.eval_examples(source)
    assert image.shape == (H, W, 3) and masks.shape == (1, H, W) and info["group"] == "g"
    (root / "images" / "g" / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="x.png"):
        datasets.prepare_image_mask_folder(root, tmp_path / "o2")


def _sa1b_image(path):
    Image.new("RGB", (2000, 1500), (128, 128, 128)).save(path, quality=50)


def test_sa1b_folder_tar_and_generate_output(tmp_path):
    folder = tmp_path / "sa1b"
    os.makedirs(folder)
    shutil.copy(SA1B_JSON, folder / "sa_226381.json")
    _sa1b_image(folder / "sa_226381.jpg")
    _, expected = sa1b.load_masks(SA1B_JSON)

    src = datasets.load_source(datasets.prepare_sa1b_folder(folder, tmp_path / "o1"))
    (image, masks, info), = data.eval_examples(src)
    assert "tensorflow" not in sys.modules
    assert image.shape == (1500, 2000, 3) and info["image_id"] == 226381
    assert info["name"] == "sa_226381.jpg"
    np.testing.assert_array_equal(masks, expected)
    assert src[0]["masks"][0].decode() == _sa1b_record()["annotations"][0][
        "segmentation"]["counts"]  # stored as the RLE string, not decoded

    # a released tar, read directly, with a second (renamed) copy of the image; a fraction of
    # 0.5 splits the two when their hashes fall on different sides
    with tarfile.open(tmp_path / "sa_000000.tar", "w") as tar:
        for stem in ("sa_226381", "sa_7"):
            record = _sa1b_record()
            record["image"]["file_name"] = f"{stem}.jpg"
            record["image"]["image_id"] = sa1b.image_id_for(stem)
            payload = json.dumps(record).encode()
            ti = tarfile.TarInfo(f"{stem}.json")
            ti.size = len(payload)
            tar.add(folder / "sa_226381.jpg", arcname=f"{stem}.jpg")
            tar.addfile(ti, io.BytesIO(payload))
    in_val = {s: datasets._in_validation(s, 0.5) for s in ("sa_226381", "sa_7")}
    fraction = 0.5 if len(set(in_val.values())) == 2 else 0.0
    b = datasets.prepare_sa1b_folder(tmp_path / "sa_000000.tar", tmp_path / "o2",
                                     validation_fraction=fraction)
    names = {s: {r[2]["name"] for r in data.eval_examples(datasets.load_source(b, s))}
             for s in b.info.splits}
    assert set().union(*names.values()) == {"sa_226381.jpg", "sa_7.jpg"}
    if fraction:
        assert not names["train"] & names["validation"]
    (_, masks2, info2), = [e for e in data.eval_examples(datasets.load_source(b, "train"))][:1]
    np.testing.assert_array_equal(masks2, expected)
    assert info2["group"] == "sa_000000"

    # `sam-jax generate` output: the annotations in one folder, the images in another
    ann, imgs = tmp_path / "ann", tmp_path / "imgs"
    os.makedirs(ann)
    os.makedirs(imgs)
    shutil.copy(SA1B_JSON, ann / "sa_226381.json")
    _sa1b_image(imgs / "sa_226381.jpg")
    src = datasets.load_source(datasets.prepare_sa1b_folder(ann, tmp_path / "o3",
                                                            images_dir=imgs))
    assert len(src) == 1
    with pytest.raises(ValueError, match="sa_226381.jpg"):
        datasets.prepare_sa1b_folder(ann, tmp_path / "o4", images_dir=tmp_path)


def test_make_example_layout_boxes_and_low_res():
    s, m = 64, 5
    image = np.full((H, W, 3), 7, np.uint8)  # 40x64 at S=64: scale 1, input size (40, 64)
    rect = _rect(H, W, 8, 20, 4, 16)
    big = np.ones((H, W), bool)  # > 90%: dropped
    tiny = _rect(H, W, 0, 1, 0, 1)  # 1 of a 16-pixel cell: empty at low res, dropped
    ex = data.make_example(image, np.stack([big, rect, tiny]), s, m, np.random.default_rng(0))
    assert {k: (v.shape, v.dtype) for k, v in ex.items()} == {
        "image": ((s, s, 3), np.uint8), "input_size": ((2,), np.int32),
        "masks": ((m, s // 4, s // 4), bool), "boxes": ((m, 4), np.float32),
        "mask_valid": ((m,), bool)}
    assert list(ex["input_size"]) == [H, W]
    assert (ex["image"][:H] == 7).all() and (ex["image"][H:] == 0).all()
    assert list(ex["mask_valid"]) == [True, False, False, False, False]
    np.testing.assert_array_equal(ex["boxes"][0], [4, 8, 15, 19])
    assert not ex["boxes"][1:].any() and not ex["masks"][1:].any()
    np.testing.assert_array_equal(ex["masks"][0], _rect(16, 16, 2, 5, 1, 4))

    # at another scale: boxes via apply_boxes, low res close to "resize, pad, 4x4 mean"
    s = 128
    ex = data.make_example(image, rect[None], s, m, np.random.default_rng(0))
    np.testing.assert_allclose(
        ex["boxes"][0], ResizeLongestSide(s).apply_boxes(np.array([[4, 8, 15, 19]]), (H, W))[0])
    h, w = ex["input_size"]
    up = np.asarray(Image.fromarray(rect.astype(np.float32)).resize((w, h), Image.BILINEAR))
    ref = np.zeros((s, s), np.float32)
    ref[:h, :w] = up
    ref = ref.reshape(s // 4, 4, s // 4, 4).mean((1, 3)) >= 0.5
    np.testing.assert_array_equal(ex["masks"][0], ref)
    assert not ex["masks"][0][-(s // 4 - (h + 3) // 4):].any()  # padding rows are False


def test_make_example_low_res_frame_of_a_patch14_backbone():
    # DINOv2's 448 px input and 128 x 128 low-res grid (stride 3.5): 448x280 image at scale 1;
    # a mask of columns [0, 224) covers exactly cells 0..63 (cell 63 ends at 224); rows
    # [0, 280) reach cell 80 (280 / 3.5), the cells below are padding
    image = np.zeros((280, 448, 3), np.uint8)
    mask = np.zeros((280, 448), bool)
    mask[:, :224] = True
    ex = data.make_example(image, mask[None], 448, 2, np.random.default_rng(0),
                           low_res_size=128)
    assert ex["masks"].shape == (2, 128, 128)
    expected = np.zeros((128, 128), bool)
    expected[:80, :64] = True
    np.testing.assert_array_equal(ex["masks"][0], expected)
    # at stride 4 the default frame is unchanged: S/4 cells
    assert data.make_example(image, mask[None], 448, 2,
                             np.random.default_rng(0))["masks"].shape == (2, 112, 112)


def test_make_example_subset_and_record_path(tmp_path):
    masks = np.stack([_rect(H, W, i, i + 8, 2 * i, 2 * i + 8) for i in range(10)])
    ex = data.make_example(np.zeros((H, W, 3), np.uint8), masks, 64, 4,
                           np.random.default_rng(3))
    assert ex["mask_valid"].all()
    # the kept masks are distinct members of the input
    starts = sorted(int(b[1]) for b in ex["boxes"])
    assert len(set(starts)) == 4 and set(starts) <= set(range(10))
    _davis(tmp_path / "d")
    source = datasets.load_source(datasets.prepare_image_mask_folder(tmp_path / "d",
                                                                     tmp_path / "o"))
    for i in range(len(source)):
        image, masks, _ = datasets.decode_record(source[i])
        a = data.make_example(image, masks, 32, 3, np.random.default_rng(i))
        b = data.example_from_record(source[i], 32, 3, np.random.default_rng(i))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture(scope="module")
def davis_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    _davis(root / "d")
    return datasets.load_source(datasets.prepare_image_mask_folder(root / "d", root / "o"))


def _assert_equal_batches(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_loader_determinism_resume_and_shards(davis_source):
    n = len(davis_source)  # 8 images
    kw = {"global_batch_size": 4, "image_size": 32, "max_masks": 2, "seed": 5,
          "worker_count": 0}  # Grain in this process; worker processes: the test below
    loader = data.TrainLoader(davis_source, process_index=0, process_count=1, **kw)
    # each epoch visits every record once
    order = [loader.record_index(s, r) for s in range(n // 4) for r in range(4)]
    assert sorted(order) == list(range(n))
    _assert_equal_batches(loader.local_batch(3), loader.local_batch(3))
    stream = [b for _, b in loader.batches(0, num_steps=5)]
    assert stream[0]["image"].shape == (4, 32, 32, 3)
    resumed = data.TrainLoader(davis_source, process_index=0, process_count=1, **kw)
    for (step, b), want in zip(resumed.batches(2, num_steps=3), stream[2:]):
        _assert_equal_batches(b, want)
    assert step == 4
    it = resumed.batches(0)  # endless; closing it stops Grain's reader threads
    next(it)
    it.close()
    # two processes: disjoint rows whose concatenation is the single-process batch
    shards = [data.TrainLoader(davis_source, process_index=p, process_count=2, **kw)
              for p in range(2)]
    for step in (0, 3):
        parts = [s.local_batch(step) for s in shards]
        assert parts[0]["image"].shape[0] == 2
        rows = [[s.record_index(step, r) for r in range(p * 2, p * 2 + 2)]
                for p, s in enumerate(shards)]
        assert not set(rows[0]) & set(rows[1])
        _assert_equal_batches({k: np.concatenate([p[k] for p in parts]) for k in parts[0]},
                              loader.local_batch(step))
    assert "tensorflow" not in sys.modules


def test_loader_errors(davis_source):
    with pytest.raises(ValueError, match="multiple of the process count"):
        data.TrainLoader(davis_source, 3, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="empty"):
        data.TrainLoader([], 2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="worker_count"):
        data.TrainLoader(davis_source, 2, process_index=0, process_count=1, worker_count=-1)
    # a record that fails to decode in a worker process: its error, naming it, reaches here
    bad = dict(davis_source[0], image=b"garbage", group=b"g", name=b"broken")
    loader = data.TrainLoader([bad], 1, image_size=32, process_index=0, process_count=1,
                              worker_count=1)
    with pytest.raises(ValueError, match="g/broken"):
        next(loader.batches(0))
    loader.close()


def _reference_batch(source, step, rows, seed, global_batch_size, image_size, max_masks):
    """The loader's order and seeding written out as they were before Grain: global row r of
    step s is position s * G + r of the per-epoch permutations from (seed, epoch), decoded
    with the rng from (seed, step, row)."""
    examples = []
    for row in rows:
        epoch, offset = divmod(step * global_batch_size + row, len(source))
        index = np.random.default_rng([seed, epoch]).permutation(len(source))[offset]
        rng = np.random.default_rng([seed, step, row])
        examples.append(data.example_from_record(source[int(index)], image_size, max_masks,
                                                 rng))
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _grain_workers():
    return {p for p in multiprocessing.active_children() if p.name.startswith("grain")}


def test_grain_workers_equal_in_process_and_reference(davis_source):
    g, seed, size, m = 4, 7, 32, 3
    kw = {"global_batch_size": g, "image_size": size, "max_masks": m, "seed": seed}
    # 6 steps of 4 = 3 epochs of the 8 records, so epoch boundaries are crossed
    want = [_reference_batch(davis_source, s, range(g), seed, g, size, m) for s in range(6)]
    assert _grain_workers() == set()
    # the tfds source goes to the workers as (folder, split) and reopens there
    wrapped = pickle.loads(pickle.dumps(data.ReopenedTfdsSource.wrap(davis_source)))
    assert len(wrapped) == len(davis_source) and wrapped[3]["name"] == davis_source[3]["name"]

    in_process = data.TrainLoader(davis_source, process_index=0, process_count=1,
                                  worker_count=0, **kw)
    got = list(in_process.batches(0, 6))
    assert [s for s, _ in got] == list(range(6)) and _grain_workers() == set()
    for s, b in got:
        _assert_equal_batches(b, want[s])
        _assert_equal_batches(b, in_process.local_batch(s))

    workers = data.TrainLoader(davis_source, process_index=0, process_count=1, worker_count=2,
                               **kw)
    resumed = workers.batches(2)  # endless, resumed in the middle of epoch 1
    for want_step in range(2, 6):
        step, b = next(resumed)
        assert step == want_step and all(type(v) is np.ndarray for v in b.values())
        _assert_equal_batches(b, want[step])
    assert len(_grain_workers()) == 2
    workers.close()  # what train.py calls last: no worker left behind
    assert _grain_workers() == set()
    resumed.close()

    # host shards through Grain (one in a worker, one here): disjoint rows whose
    # concatenation is the single-process batch
    shards = [data.TrainLoader(davis_source, process_index=p, process_count=2,
                               worker_count=1 - p, **kw) for p in range(2)]
    parts = [list(s.batches(3, 2)) for s in shards]
    for i, step in enumerate((3, 4)):
        rows = [{s.record_index(step, r) for r in range(p * 2, p * 2 + 2)}
                for p, s in enumerate(shards)]
        assert not rows[0] & rows[1]
        _assert_equal_batches({k: np.concatenate([p[i][1][k] for p in parts])
                               for k in want[step]}, want[step])
    for s in shards:
        s.close()
    assert _grain_workers() == set()


_ORPHAN_PROBE = """
import multiprocessing, sys
from sam_jax.training import data, datasets
loader = data.TrainLoader(datasets.load_source(sys.argv[1]), 2, image_size=32, max_masks=1,
                          process_index=0, process_count=1, worker_count=1)
batches = loader.batches(0)
next(batches)
print(*[p.pid for p in multiprocessing.active_children() if p.name.startswith("grain")],
      flush=True)
sys.stdin.read()
"""


def test_workers_end_when_the_training_process_is_killed(davis_source):
    """SIGKILL (preemption; the resume test of test_training_loop) closes nothing: the
    workers notice that their parent is gone and exit instead of lingering."""
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN_PROBE,
                             str(davis_source.dataset_info.data_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(pids) == 1

    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + 30
    while alive(pids[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pids[0])
