"""Tests for sam_jax/hub.py, end to end against a local HTTP server.

A `ThreadingHTTPServer` on 127.0.0.1 serves a small official-format checkpoint (the official
`Sam` built for `sam_jax.tiny()`, seeded weights, `torch.save`d), registered under the name
"vit_b" with its real size and SHA-256 through `hub.OFFICIAL_CHECKPOINTS`. The server honours
Range requests (or can be told not to), and can serve a corrupted copy, cut each of its next
responses after N bytes, or stop at a byte offset as a server going down would. It records
every request, so "no network" is checked as "no request".
"""

import hashlib
import http.server
import json
import os
import re
import socket
import sys
import threading

import jax
import numpy as np
import pytest

from sam_jax import hub
from sam_jax.hub import Checkpoint, HubError

NAME = "vit_b"
FILE = hub.OFFICIAL_CHECKPOINTS[NAME].file


# ---- the server ----------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        owner = self.server.owner
        data = owner.files.get(self.path)
        wanted = self.headers.get("Range")
        if data is None:
            owner.log(self.path, wanted, 404)
            self.send_error(404)
            return
        if owner.corrupt:  # same length, one byte changed: only the hash can tell
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        start = 0
        if wanted and owner.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(data):
                owner.log(self.path, wanted, 416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            owner.log(self.path, wanted, 206)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            owner.log(self.path, wanted, 200)
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        end = len(data)
        if owner.stop_at is not None:
            end = max(start, min(end, owner.stop_at))
        if owner.cuts_left > 0:
            owner.cuts_left -= 1
            end = min(end, start + owner.cut_after)
        self.wfile.write(data[start:end])
        # fewer bytes than Content-Length: the connection closes when this returns
        self.close_connection = True


class FileServer:
    """Serves `files` (URL path -> bytes). Knobs, reset by `reset()`:
    corrupt: serve a copy with one byte flipped; ranges: honour Range headers;
    cut_after + cuts_left: the next `cuts_left` responses stop after `cut_after` body bytes;
    stop_at: every response stops at this absolute offset (a server that went down)."""

    def __init__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.reset()

    def reset(self):
        self.files, self.requests = {}, []
        self.corrupt, self.ranges = False, True
        self.cut_after, self.cuts_left, self.stop_at = 0, 0, None

    def log(self, path, range_header, status):
        self.requests.append((path, range_header, status))

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = FileServer()
    yield s
    s.close()


# ---- the checkpoint ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_tiny():
    pytest.importorskip("torch")
    pytest.importorskip("segment_anything")
    import sam_jax
    from official import seeded_official
    return seeded_official(sam_jax.tiny(), seed=0)


@pytest.fixture(scope="module")
def pth(official_tiny, tmp_path_factory):
    """(path, bytes, sha256) of the tiny official checkpoint."""
    import torch
    path = tmp_path_factory.mktemp("pth") / "sam_tiny.pth"
    torch.save(official_tiny.state_dict(), path)
    data = path.read_bytes()
    return path, data, hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def direct(pth):
    """The variables of loading the .pth directly (the reference for everything cached)."""
    import sam_jax
    return sam_jax.load(pth[0], model_type="tiny").variables


@pytest.fixture
def cache(server, pth, tmp_path, monkeypatch):
    """A fresh cache dir, the server as base URL, and the tiny checkpoint registered as "vit_b"
    with its real size and hash. Returns the cache dir."""
    _, data, sha = pth
    server.reset()
    server.files[f"/weights/{FILE}"] = data
    monkeypatch.setenv("SAM_JAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SAM_JAX_BASE_URL", f"{server.url}/weights/")
    monkeypatch.setitem(hub.OFFICIAL_CHECKPOINTS, NAME, Checkpoint(FILE, len(data), sha, "tiny"))
    return tmp_path / "cache"


def downloads(cache):
    """Files in <cache>/downloads, lock files aside."""
    folder = cache / "downloads"
    return sorted(n for n in os.listdir(folder) if not n.endswith(".lock")) if folder.is_dir() \
        else []


def converted_entries(cache):
    folder = cache / "converted"
    return sorted(n for n in os.listdir(folder) if not n.endswith(".lock")) if folder.is_dir() \
        else []


def assert_same_variables(a, b):
    fa = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(a)}
    fb = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(b)}
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


# ---- locations -----------------------------------------------------------------------------

def test_cache_dir_and_base_url_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM_JAX_CACHE_DIR", str(tmp_path / "mine"))
    assert hub.cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("SAM_JAX_BASE_URL", raising=False)
    assert hub.base_url() == "https://dl.fbaipublicfiles.com/segment_anything/"
    monkeypatch.setenv("SAM_JAX_BASE_URL", "http://mirror.example/sam/")
    assert hub.base_url() == "http://mirror.example/sam/"


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="XDG layout")
def test_cache_dir_default_is_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("SAM_JAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == str(tmp_path / "xdg" / "sam_jax")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # invalid per the XDG spec
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == str(tmp_path / "home" / ".cache" / "sam_jax")


def test_registry_lists_the_official_files():
    for name, entry in hub.OFFICIAL_CHECKPOINTS.items():
        assert entry.file == f"sam_{name}_{entry.file.split('_')[-1]}"
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256) and entry.size > 300_000_000
        assert entry.model_type == name


# ---- download, convert, load ---------------------------------------------------------------

def test_download_convert_load_equals_the_pth(cache, server, pth, direct):
    import sam_jax

    path = hub.download(NAME, progress=False)
    assert path == str(cache / "downloads" / FILE)
    with open(path, "rb") as f:
        assert f.read() == pth[1]
    assert downloads(cache) == [FILE, FILE + ".sha256"]
    assert (cache / "downloads" / (FILE + ".sha256")).read_text().split() == [pth[2], FILE]
    assert server.requests == [(f"/weights/{FILE}", None, 200)]

    out = hub.converted(NAME)
    assert out == str(cache / "converted" / NAME)
    assert converted_entries(cache) == [NAME]  # no temporary directory left behind
    with open(os.path.join(out, "config.json")) as f:
        extra = json.load(f)
    assert extra["source"] == f"pth:official:{FILE}@sha256:{pth[2]}"
    assert extra["model_type"] == "tiny"
    assert_same_variables(sam_jax.load(out).variables, direct)

    # every later call is a cache hit: no request, the same directory
    assert hub.resolve(NAME) == out
    assert hub.converted(NAME) == out
    assert len(server.requests) == 1


def test_a_conversion_of_other_bytes_is_redone(cache, server, pth, monkeypatch, tmp_path):
    """The converted directory records the source's hash: when the registry names other bytes,
    the old conversion is replaced, not returned."""
    import sam_jax
    import torch
    from official import seeded_official

    first = hub.converted(NAME)
    other = tmp_path / "other.pth"
    torch.save(seeded_official(sam_jax.tiny(), seed=1).state_dict(), other)
    data = other.read_bytes()
    server.files["/weights/sam_vit_b_other.pth"] = data
    monkeypatch.setitem(hub.OFFICIAL_CHECKPOINTS, NAME, Checkpoint(
        "sam_vit_b_other.pth", len(data), hashlib.sha256(data).hexdigest(), "tiny"))
    assert hub.converted(NAME) == first
    assert converted_entries(cache) == [NAME]  # the old one is gone, no temporary left
    assert_same_variables(sam_jax.load(first).variables,
                          sam_jax.load(other, model_type="tiny").variables)


def test_checksum_mismatch_is_refused_and_nothing_is_cached(cache, server, pth):
    server.corrupt = True
    data = bytearray(pth[1])
    data[len(data) // 2] ^= 0xFF
    got = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(HubError) as error:
        hub.download(NAME, progress=False)
    message = str(error.value)
    for words in ("SHA-256 mismatch", pth[2], got, f"{server.url}/weights/{FILE}",
                  "nothing was cached"):
        assert words in message, (words, message)
    assert downloads(cache) == []  # no final file, no record, no .part

    with pytest.raises(HubError, match="SHA-256 mismatch"):
        hub.converted(NAME)
    assert downloads(cache) == [] and converted_entries(cache) == []

    server.corrupt = False  # the next call starts over and succeeds
    assert open(hub.download(NAME, progress=False), "rb").read() == pth[1]


def test_a_different_size_is_refused_before_writing(cache, server, pth):
    server.files[f"/weights/{FILE}"] = pth[1] + b"\0"
    with pytest.raises(HubError, match=f"offers {len(pth[1]) + 1} bytes, expected {len(pth[1])}"):
        hub.download(NAME, progress=False)
    assert downloads(cache) == []


def test_a_cut_transfer_resumes_with_a_range_request(cache, server, pth):
    size, cut = len(pth[1]), len(pth[1]) // 3
    server.cut_after, server.cuts_left = cut, 1
    path = hub.download(NAME, progress=False)
    assert open(path, "rb").read() == pth[1]
    assert [(r, s) for _, r, s in server.requests] == [(None, 200), (f"bytes={cut}-", 206)]
    assert size > cut and downloads(cache) == [FILE, FILE + ".sha256"]


def test_a_cut_transfer_restarts_when_the_server_ignores_range(cache, server, pth):
    server.ranges = False
    server.cut_after, server.cuts_left = len(pth[1]) // 3, 1
    path = hub.download(NAME, progress=False)
    assert open(path, "rb").read() == pth[1]
    # asked to resume, answered with the whole file: written from the start
    assert [(r, s) for _, r, s in server.requests] == [(None, 200),
                                                       (f"bytes={len(pth[1]) // 3}-", 200)]


def test_a_server_going_down_keeps_a_part_that_the_next_call_resumes(cache, server, pth):
    half = len(pth[1]) // 2
    server.stop_at = half
    with pytest.raises(HubError) as error:
        hub.download(NAME, progress=False)
    message = str(error.value)
    assert f"{half} of {len(pth[1])} bytes are kept" in message
    assert str(cache / "downloads" / FILE) in message and "SAM_JAX_BASE_URL" in message
    # the partial transfer exists only as .part: nothing under the final name
    assert downloads(cache) == [FILE + ".part"]
    assert (cache / "downloads" / (FILE + ".part")).stat().st_size == half
    with pytest.raises(HubError):
        hub.converted(NAME)
    assert converted_entries(cache) == []

    server.stop_at = None
    server.requests.clear()
    assert open(hub.download(NAME, progress=False), "rb").read() == pth[1]
    assert [(r, s) for _, r, s in server.requests] == [(f"bytes={half}-", 206)]
    assert downloads(cache) == [FILE, FILE + ".sha256"]


def test_a_cache_hit_makes_no_request(cache, server, pth):
    path = hub.download(NAME, progress=False)
    server.requests.clear()
    assert hub.download(NAME, progress=False) == path
    out = hub.converted(NAME)  # converts from the cached file
    assert hub.converted(NAME) == out
    assert server.requests == []

    # without the record, the file is hashed once more (still no request), and recorded again
    record = cache / "downloads" / (FILE + ".sha256")
    record.unlink()
    assert hub.download(NAME, progress=False) == path and record.is_file()
    assert server.requests == []


def test_a_file_replaced_after_its_record_is_checked_again(cache, server, pth):
    path = hub.download(NAME, progress=False)
    record = cache / "downloads" / (FILE + ".sha256")
    with open(path, "r+b") as f:  # same size, other bytes, written after the record
        f.write(b"\0" * 16)
    later = record.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(later, later))
    with pytest.raises(HubError, match="SHA-256 .* expected .*delete it"):
        hub.download(NAME, progress=False)
    assert len(server.requests) == 1


def test_a_hand_placed_file_is_verified_once_without_network(cache, server, pth):
    folder = cache / "downloads"
    folder.mkdir(parents=True)
    (folder / FILE).write_bytes(pth[1])
    assert hub.download(NAME, progress=False) == str(folder / FILE)
    assert server.requests == [] and (folder / (FILE + ".sha256")).is_file()


def test_offline_names_the_url_and_the_place(cache, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/mirror/"
    monkeypatch.setenv("SAM_JAX_BASE_URL", url)
    for call in (lambda: hub.download(NAME, progress=False), lambda: hub.converted(NAME)):
        with pytest.raises(HubError) as error:
            call()
        message = str(error.value)
        for words in (url + FILE, str(cache / "downloads" / FILE), "SAM_JAX_BASE_URL",
                      "Download it yourself"):
            assert words in message, (words, message)
    assert downloads(cache) == [] and converted_entries(cache) == []


def test_http_error_names_the_url_and_the_place(cache, server):
    server.files.clear()
    with pytest.raises(HubError, match="HTTP 404") as error:
        hub.download(NAME, progress=False)
    assert str(cache / "downloads" / FILE) in str(error.value)
    assert len(server.requests) == 1  # not retried


def test_unknown_name():
    with pytest.raises(HubError, match="vit_x.*vit_b.*facebook/sam-vit-base"):
        hub.download("vit_x")


def test_resolve_prefers_existing_paths(cache, server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    assert hub.resolve(NAME) == NAME  # a local folder called vit_b stays a path
    assert hub.resolve("no/such/thing") == "no/such/thing"
    assert server.requests == []


# ---- Hugging Face --------------------------------------------------------------------------

def test_hf_name_without_huggingface_hub(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(HubError, match=r"pip install huggingface_hub"):
        hub.converted("facebook/sam-vit-base")
    assert converted_entries(cache) == []


@pytest.fixture
def safetensors_file(official_tiny, tmp_path):
    """The tiny official state dict as model.safetensors (official layout, which the reader
    takes as well as Hugging Face's)."""
    torch_st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "hf" / "model.safetensors"
    path.parent.mkdir()
    torch_st.save_file({k: v.contiguous() for k, v in official_tiny.state_dict().items()}, path)
    return path


def test_hf_name_is_fetched_and_converted_once(cache, monkeypatch, safetensors_file, direct):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    import sam_jax

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(safetensors_file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setitem(hub.HF_REPOS, "facebook/sam-vit-base", "tiny")
    out = hub.resolve("facebook/sam-vit-base")
    assert out == str(cache / "converted" / "facebook--sam-vit-base")
    assert calls == [("facebook/sam-vit-base", "model.safetensors")]
    assert_same_variables(sam_jax.load(out).variables, direct)
    assert hub.converted("facebook/sam-vit-base") == out and len(calls) == 1


def test_hf_errors_are_explained(cache, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, filename, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(HubError, match="facebook/sam-vit-huge.*unreachable.*HF_ENDPOINT"):
        hub.converted("facebook/sam-vit-huge")
    assert converted_entries(cache) == []


def test_load_and_cli_take_official_names(cache, server, pth, direct, capsys, tmp_path):
    import sam_jax
    from sam_jax import cli

    # `sam-jax download NAME` fetches, verifies and converts; the printed path is the cache's
    assert cli.main(["download", NAME, "-q"]) == 0
    out = capsys.readouterr().out
    assert str(cache / "converted" / NAME) in out
    assert len(server.requests) == 1
    # afterwards the name works offline, in Python and as --checkpoint
    assert_same_variables(sam_jax.load(NAME).variables, direct)
    image = tmp_path / "gray.png"
    from PIL import Image
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(image)
    status = cli.main(["segment", str(image), "--checkpoint", NAME, "--point", "30,20",
                       "-o", str(tmp_path / "seg"), "-q"])
    assert status == 0, capsys.readouterr().err
    assert (tmp_path / "seg.png").exists()
    assert len(server.requests) == 1


def test_cli_download_offline_is_one_clear_line(cache, monkeypatch, capsys):
    from sam_jax import cli

    monkeypatch.setenv("SAM_JAX_BASE_URL", "http://127.0.0.1:9/nowhere/")
    assert cli.main(["download", NAME, "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sam-jax: error: ") and str(cache / "downloads" / FILE) in err
    assert "Traceback" not in err


def test_load_without_a_path_refuses_other_model_types():
    import sam_jax

    with pytest.raises(ValueError, match="load\\('vit_h'\\)"):
        sam_jax.load(model_type="vit_h")
