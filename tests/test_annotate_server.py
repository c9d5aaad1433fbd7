"""The `sam-jax annotate` web app's API through Starlette's test client, on real DAVIS frames
(tests/data/davis_mini) with a tiny random-weight model: a click gives 3 candidate masks, the
next click feeds the chosen one's logits back, an accepted mask is written as SA-1B RLE that
decodes (pycocotools) to exactly the mask sent, bad prompts and unsafe names get clear errors,
the semi-automatic prefill happens once, and the checkpoint switches without a restart."""

import base64
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from sam_jax.annotate import server  # noqa: E402
from sam_jax.annotate.server import build_app, mask_to_data_url  # noqa: E402
from sam_jax.annotate.session import ModelSession  # noqa: E402
from sam_jax.annotate.store import AnnotationStore  # noqa: E402

DAVIS = os.path.join(os.path.dirname(__file__), "data", "davis_mini", "JPEGImages", "480p")
W, H = 427, 240


@pytest.fixture(scope="module")
def tiny_model():
    import sam_jax
    from random_weights import random_variables
    from sam_jax.inference import SamModel

    cfg = sam_jax.tiny()
    return SamModel(cfg, random_variables(cfg, seed=3))


@pytest.fixture
def make_client(tmp_path, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(os.path.join(DAVIS, "camel", "00000.jpg"), images / "camel.jpg")
    shutil.copy(os.path.join(DAVIS, "cows", "00000.jpg"), images / "cows.jpg")
    made = []

    def make(mode="manual", **kwargs):
        store = AnnotationStore(str(images), str(tmp_path / "out"))
        session = ModelSession(tiny_model, store.image_path)
        made.append(session)
        app = build_app(store, session, mode=mode, annotator="tester", **kwargs)
        return TestClient(app), store, session

    yield make
    for session in made:
        session.close()


def _mask(url):
    raw = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw))) >= 128


def test_click_candidates_refine_and_accept_round_trip(make_client):
    from pycocotools import mask as mask_utils

    client, store, session = make_client()
    listing = client.get("/api/images").json()
    assert [i["name"] for i in listing["images"]] == ["camel.jpg", "cows.jpg"]
    opened = client.post("/api/open", json={"name": "camel.jpg"}).json()
    assert (opened["width"], opened["height"], opened["objects"]) == (W, H, [])
    one = client.post("/api/predict", json={"name": "camel.jpg", "points": [[200, 120]],
                                            "labels": [1], "multimask": True}).json()
    assert len(one["masks"]) == len(one["scores"]) == len(one["tokens"]) == 3
    assert _mask(one["masks"][0]).shape == (H, W)
    best = int(np.argmax(one["scores"]))
    two = client.post("/api/predict", json={
        "name": "camel.jpg", "points": [[200, 120], [20, 20]], "labels": [1, 0],
        "mask_token": one["tokens"][best], "multimask": False}).json()
    assert len(two["masks"]) == 1
    # what the predictor gives for the same prompt and the same logits fed back
    expected, _, _ = session.predict("camel.jpg", [[200, 120], [20, 20]], [1, 0],
                                     mask_token=one["tokens"][best], multimask=False)
    np.testing.assert_array_equal(_mask(two["masks"][0]), expected[0])
    # the annotator edits the mask (brush) before accepting: the edited mask is what is kept
    edited = _mask(two["masks"][0])
    edited[100:140, 50:90] = True
    ann = client.post("/api/accept", json={
        "name": "camel.jpg", "mask": mask_to_data_url(edited), "label": "camel",
        "prompts": {"points": [[200, 120], [20, 20]], "labels": [1, 0]},
        "predicted_iou": two["scores"][0], "seconds": 7.5}).json()
    record = json.loads(open(os.path.join(store.out_dir, "camel.json")).read())
    (saved,) = record["annotations"]
    assert saved["object_id"] == ann["object_id"] and saved["label"] == "camel"
    assert saved["annotator"] == "tester" and saved["seconds"] == 7.5
    decoded = mask_utils.decode({"size": saved["segmentation"]["size"],
                                 "counts": saved["segmentation"]["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), edited)
    # the tool shows it, and the list counts it
    objects = client.get("/api/objects/camel.jpg").json()["objects"]
    np.testing.assert_array_equal(_mask(objects[0]["mask"]), edited)
    assert client.get("/api/images").json()["images"][0]["objects"] == 1
    client.post("/api/done", json={"name": "camel.jpg", "done": True, "seconds": 2.5})
    assert client.get("/api/images").json()["images"][0]["done"] is True
    client.post("/api/remove", json={"name": "camel.jpg", "object_id": ann["object_id"]})
    assert client.get("/api/objects/camel.jpg").json()["objects"] == []


def test_next_image_is_embedded_in_the_background(make_client):
    client, _, session = make_client()
    client.post("/api/open", json={"name": "camel.jpg"})
    future = session._pending.get("cows.jpg")
    assert future is not None or "cows.jpg" in session._cache
    if future is not None:
        future.result(timeout=60)
    client.post("/api/open", json={"name": "cows.jpg"})
    assert "cows.jpg" in session._cache and "camel.jpg" in session._cache


@pytest.mark.parametrize("body, words", [
    ({"name": "camel.jpg", "points": [[500, 10]], "labels": [1]}, "outside the 427x240 image"),
    ({"name": "camel.jpg", "points": [[5, 5]], "labels": [3]}, "label"),
    ({"name": "camel.jpg", "points": [[5, 5]], "labels": []}, "1 points but 0 labels"),
    ({"name": "camel.jpg"}, "no prompt"),
    ({"name": "camel.jpg", "box": [50, 50, 10, 10]}, "box"),
    ({"name": "camel.jpg", "points": [[5, 5]], "labels": [1], "mask_token": "nope"},
     "mask token"),
])
def test_bad_prompts_are_clear_400s(make_client, body, words):
    client, _, _ = make_client()
    r = client.post("/api/predict", json=body)
    assert r.status_code == 400 and words in r.json()["error"], r.json()


def test_names_never_leave_the_images_folder(make_client, tmp_path):
    client, _, _ = make_client()
    (tmp_path / "secret.jpg").write_bytes(b"not for you")
    for url in ("/api/image/..%2Fsecret.jpg", "/api/image/%2Fetc%2Fpasswd",
                "/api/objects/..%2Fsecret.jpg"):
        r = client.get(url)
        assert r.status_code == 404 and b"not for you" not in r.content, url
    for name in ("../secret.jpg", "/etc/passwd", "images/camel.jpg", None, 7):
        r = client.post("/api/open", json={"name": name})
        assert r.status_code == 404, (name, r.json())
    assert client.get("/api/image/camel.jpg").content[:2] == b"\xff\xd8"  # the JPEG itself


def test_bodies_are_size_limited_and_validated(make_client):
    client, _, _ = make_client(max_body_bytes=2048)
    r = client.post("/api/accept", json={"name": "camel.jpg", "mask": "x" * 5000})
    assert r.status_code == 413
    r = client.post("/api/predict", content=b"[1, 2", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    client.post("/api/open", json={"name": "camel.jpg"})
    r = client.post("/api/accept", json={"name": "camel.jpg", "mask": "data:image/png;base64,AAAA"})
    assert r.status_code == 400 and "PNG" in r.json()["error"]
    small = mask_to_data_url(np.ones((10, 10), bool))
    r = client.post("/api/accept", json={"name": "camel.jpg", "mask": small})
    assert r.status_code == 400 and "10x10, the image 427x240" in r.json()["error"]


def test_semi_automatic_prefill_once(make_client, monkeypatch):
    auto = np.zeros((H, W), bool)
    auto[30:90, 40:200] = True
    calls = []

    def fake_generator(model, image):
        calls.append(image.shape)
        return [{"mask": auto, "predicted_iou": 0.93, "stability_score": 0.97,
                 "point": [100.0, 60.0]}]

    monkeypatch.setattr(server, "_generator_objects", fake_generator)
    client, store, _ = make_client(mode="semi")
    first = client.post("/api/open", json={"name": "cows.jpg"}).json()
    assert first["prefilled"] is True and len(first["objects"]) == 1
    assert first["objects"][0]["source"] == "automatic"
    np.testing.assert_array_equal(_mask(first["objects"][0]["mask"]), auto)
    # reopening (another tab, a restart) does not fill in again, and removal sticks
    again = client.post("/api/open", json={"name": "cows.jpg"}).json()
    assert again["prefilled"] is False and len(again["objects"]) == 1 and len(calls) == 1
    client.post("/api/remove", json={"name": "cows.jpg",
                                     "object_id": again["objects"][0]["object_id"]})
    assert client.post("/api/open", json={"name": "cows.jpg"}).json()["objects"] == []


def test_checkpoint_switch_without_restart(make_client, tiny_model):
    import dataclasses

    from random_weights import random_variables

    other = dataclasses.replace(tiny_model, variables=random_variables(tiny_model.config, 9))
    loaded = []
    client, _, session = make_client(load_checkpoint=lambda p: loaded.append(p) or other)
    client.post("/api/open", json={"name": "camel.jpg"})
    prompt = {"name": "camel.jpg", "points": [[200, 120]], "labels": [1]}
    before = client.post("/api/predict", json=prompt).json()["scores"]
    r = client.post("/api/checkpoint", json={"checkpoint": "/models/round2"})
    assert r.json() == {"checkpoint": "/models/round2"} and loaded == ["/models/round2"]
    after = client.post("/api/predict", json=prompt).json()["scores"]
    assert before != after  # the new weights answer
    assert client.get("/api/images").json()["checkpoint"] == "/models/round2"


def test_stats_command(make_client, capsys):
    from conftest import call

    client, store, _ = make_client()
    client.post("/api/open", json={"name": "camel.jpg"})
    m = np.zeros((H, W), bool)
    m[10:20, 10:20] = True
    for seconds in (4.0, 6.0):
        client.post("/api/accept", json={"name": "camel.jpg", "mask": mask_to_data_url(m),
                                         "seconds": seconds})
    status, out, err = call(capsys, "annotate", "--stats", store.out_dir)
    assert status == 0, err
    stats = json.loads(out)
    assert stats["images"] == 1 and stats["manual_masks_per_image"]["total"] == 2
    assert stats["seconds_per_image"]["total"] == 10.0 and stats["seconds_per_manual_mask"] == 5.0


def test_mask_png_modes_from_browsers_and_tools():
    from sam_jax.annotate.server import data_url_to_mask

    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:7] = True

    def url(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    gray = Image.fromarray(mask.astype(np.uint8) * 255)
    canvas = gray.convert("RGBA")  # what a canvas's toDataURL gives: opaque white on black
    cutout = Image.new("RGBA", (8, 6), (255, 255, 255, 0))  # white, transparent outside
    cutout.putalpha(Image.fromarray(mask.astype(np.uint8) * 255))
    for image in (gray, canvas, cutout, gray.convert("1"), gray.convert("RGB")):
        np.testing.assert_array_equal(data_url_to_mask(url(image), 8, 6), mask)
