"""The official SAM weights by name: download, verify, convert once, cache (no counterpart in the
official repository, whose README links the three files for users to fetch by hand).

    path = hub.download("vit_b")        # <cache>/downloads/sam_vit_b_01ec64.pth, SHA-256 checked
    ckpt = hub.converted("vit_b")       # <cache>/converted/vit_b, an Orbax directory
    sam_jax.load(hub.resolve("vit_b"))  # what `sam_jax.load("vit_b")` does

Cache layout (`cache_dir()`: $SAM_JAX_CACHE_DIR, else the per-user cache directory):
  downloads/<file>          only ever exists verified: the transfer goes to <file>.part, its
                            SHA-256 is checked, and only then is it renamed (atomically)
  downloads/<file>.sha256   written after that check (`sha256sum` format), so a later cache
                            hit checks the size and this record instead of re-hashing 2.5 GB
  downloads/<file>.part     an interrupted transfer; the next call resumes it with an HTTP
                            Range request (or restarts when the server ignores Range)
  converted/<name>/         `save_converted` output, written to a temporary directory in
                            converted/ and renamed into place when complete
A cache hit does not touch the network. `SAM_JAX_BASE_URL` points at a mirror (a folder
serving the official file names, http(s):// or file://).

Hugging Face names (`facebook/sam-vit-base`, `-large`, `-huge`) are fetched with
`huggingface_hub` (its own cache and checks), then converted once into converted/<owner>--<name>.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

__all__ = ["Checkpoint", "HF_REPOS", "HubError", "OFFICIAL_BASE_URL", "OFFICIAL_CHECKPOINTS",
           "base_url", "cache_dir", "converted", "download", "resolve"]

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class Checkpoint:
    """One downloadable checkpoint: its file name under the base URL, exact size in bytes,
    SHA-256, and the sam_jax preset it converts to."""
    file: str
    size: int
    sha256: str
    model_type: str


# Sizes and SHA-256 of the files Meta serves (the official README gives only the URLs). Each hash
# agrees in at least three independent public registries that verify these downloads:
#   computational-cell-analytics/micro-sam  micro_sam/util.py (pooch registry, all three);
#   mazurowski-lab/SlicerSegmentWithSAM  SegmentWithSAM/SegmentWithSAM.py (3D Slicer's
#     downloadFileIntoCache checksums, all three);
#   SimpleSDXL (fork Navezjt/SimpleSDXL)  enhanced/models_info.py (size and hash, all three).
# The sizes also agree with other download scripts that check only the size.
# The tests replace entries (monkeypatch.setitem) to serve a small checkpoint under these names.
OFFICIAL_CHECKPOINTS: Dict[str, Checkpoint] = {
    "vit_b": Checkpoint("sam_vit_b_01ec64.pth", 375_042_383,
                        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
                        "vit_b"),
    "vit_l": Checkpoint("sam_vit_l_0b3195.pth", 1_249_524_607,
                        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
                        "vit_l"),
    "vit_h": Checkpoint("sam_vit_h_4b8939.pth", 2_564_550_879,
                        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
                        "vit_h"),
}

# Hugging Face `transformers.SamModel` repositories -> the preset their weights convert to.
HF_REPOS: Dict[str, str] = {
    "facebook/sam-vit-base": "vit_b",
    "facebook/sam-vit-large": "vit_l",
    "facebook/sam-vit-huge": "vit_h",
}
HF_FILE = "model.safetensors"

CHUNK = 1 << 20
TIMEOUT_S = 60  # per blocking socket operation, not for the whole transfer
# Attempts per call while a transfer keeps advancing: a cut connection is resumed at once, a
# server that refuses or sends nothing fails the call immediately with the offline message.
MAX_ATTEMPTS = 5


class HubError(OSError):
    """A download or cache failure. The message says what to fetch and where to put it.
    An OSError so that callers reporting I/O failures (the CLI) show it as one line."""


# ---- locations ----------------------------------------------------------------------------

def cache_dir() -> str:
    """$SAM_JAX_CACHE_DIR, else the platform's per-user cache: ~/Library/Caches/sam_jax on
    macOS, %LOCALAPPDATA%/sam_jax/Cache on Windows, $XDG_CACHE_HOME/sam_jax or
    ~/.cache/sam_jax elsewhere."""
    if os.environ.get("SAM_JAX_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["SAM_JAX_CACHE_DIR"]))
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Caches/sam_jax")
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~/AppData/Local")
        return os.path.join(local, "sam_jax", "Cache")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # the XDG spec says a relative $XDG_CACHE_HOME is invalid and must be ignored
    base = xdg if os.path.isabs(xdg) else os.path.expanduser("~/.cache")
    return os.path.join(base, "sam_jax")


def base_url() -> str:
    """$SAM_JAX_BASE_URL (a mirror, or a local server in tests), else Meta's."""
    return os.environ.get("SAM_JAX_BASE_URL") or OFFICIAL_BASE_URL


def _url(entry: Checkpoint) -> str:
    return base_url().rstrip("/") + "/" + entry.file


def _official(name: str) -> Checkpoint:
    if name not in OFFICIAL_CHECKPOINTS:
        raise HubError(f"unknown checkpoint name {name!r}: the official names are "
                       f"{sorted(OFFICIAL_CHECKPOINTS)}; converted() and sam_jax.load also "
                       f"take the Hugging Face ids {sorted(HF_REPOS)}")
    return OFFICIAL_CHECKPOINTS[name]


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on `path` (a small file left in place), so two processes do not
    append to one .part or convert into one directory. POSIX only; elsewhere no lock, and a
    clash is still caught by the checksum."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- verification -------------------------------------------------------------------------

def _sha256(path: str, progress: bool = False) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                     unit_divisor=1024, desc=f"verify {os.path.basename(path)}",
                                     disable=not progress, leave=False) as bar:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _recorded_hash(final: str) -> Optional[str]:
    """The hash in `final`.sha256, if that record is not older than the file (a file copied in
    by hand after the record was written is hashed again)."""
    record = final + ".sha256"
    try:
        if os.stat(record).st_mtime_ns < os.stat(final).st_mtime_ns:
            return None
        with open(record) as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return None


def _cached(entry: Checkpoint, final: str, progress: bool) -> bool:
    """Whether `final` holds the verified file. Raises on a file there that is not it: the
    final name is only ever written verified, so it was put there by hand."""
    if not os.path.isfile(final):
        return False
    size = os.path.getsize(final)
    if size != entry.size:
        raise HubError(f"{final}: {size} bytes, expected {entry.size} for {entry.file}; delete "
                       "it and call again to download it")
    if _recorded_hash(final) == entry.sha256:
        return True
    got = _sha256(final, progress)  # placed by hand, or the record is stale: check once
    if got != entry.sha256:
        raise HubError(f"{final}: SHA-256 {got}, expected {entry.sha256} for {entry.file}; "
                       "delete it and call again to download it")
    _write_atomic(final + ".sha256", f"{got}  {entry.file}\n")
    return True


# ---- transfer -----------------------------------------------------------------------------

def _offline_message(entry: Checkpoint, url: str, final: str, reason: str) -> str:
    return (f"could not download {entry.file} from {url} ({reason}). Download it yourself and "
            f"put it at {final} (it must have SHA-256 {entry.sha256} and {entry.size} bytes), "
            "or set SAM_JAX_BASE_URL to a mirror that serves "
            f"{entry.file} (SAM_JAX_CACHE_DIR moves the cache)")


def _transfer(url: str, part: str, entry: Checkpoint, progress: bool) -> None:
    """One HTTP request appending to `part` (Range from its size) or rewriting it (when the
    server answers 200). Returns when the response body ends, however short; the caller
    compares sizes. Raises HubError for answers that are not the file."""
    from tqdm import tqdm

    offset = _size(part)
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our .part is not a prefix the server recognises
            os.remove(part)
            return
        raise
    with response:
        status = response.status or 200  # file:// answers have no status
        if status == 206 and offset:
            if not (response.headers.get("Content-Range") or "").startswith(f"bytes {offset}-"):
                raise HubError(f"{url}: answered a Range request for bytes {offset}- with "
                               f"Content-Range {response.headers.get('Content-Range')!r}")
            mode = "ab"
        elif status == 200:
            offset, mode = 0, "wb"  # no Range support: start over
        else:
            raise HubError(f"{url}: unexpected HTTP status {status}")
        length = response.headers.get("Content-Length")
        if length is not None and offset + int(length) != entry.size:
            # a different file (or an error page): refuse before writing anything
            raise HubError(f"{url}: the server offers {offset + int(length)} bytes, expected "
                           f"{entry.size} for {entry.file}; nothing was cached")
        with open(part, mode) as f, tqdm(total=entry.size, initial=offset, unit="B",
                                         unit_scale=True, unit_divisor=1024, desc=entry.file,
                                         disable=not progress) as bar:
            while f.tell() <= entry.size:
                chunk = response.read(CHUNK)
                if not chunk:
                    return
                f.write(chunk)
                bar.update(len(chunk))
    os.remove(part)  # longer than the file can be: not a prefix of it
    raise HubError(f"{url}: more than the expected {entry.size} bytes of {entry.file}; "
                   "nothing was cached")


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def _fetch(entry: Checkpoint, part: str, final: str, progress: bool) -> None:
    """Brings `part` to the full size, resuming while each attempt advances."""
    url = _url(entry)
    for _ in range(MAX_ATTEMPTS):
        before = _size(part)
        if before == entry.size:
            return
        try:
            _transfer(url, part, entry, progress)
            reason = "the connection closed early"
        except HubError:
            raise
        except urllib.error.HTTPError as e:  # 404 and the like: asking again will not help
            raise HubError(_offline_message(entry, url, final, f"HTTP {e.code} {e.reason}")
                           ) from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timeout, DNS...
            reason = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        after = _size(part)
        if after == entry.size:
            return
        restarted = before > 0 and after == 0  # a 416 dropped our .part: start over
        if after <= before and not restarted:  # this attempt brought nothing new
            break
    raise HubError(_offline_message(entry, url, final, f"{reason}; {after} of {entry.size} "
                                    f"bytes are kept in {part} and the next call resumes"
                                    if after else reason))


def download(name: str, *, progress: bool = True) -> str:
    """The path of the verified official checkpoint `name` ("vit_b", "vit_l", "vit_h"),
    downloading it into <cache>/downloads/ if needed. A cache hit does not touch the network."""
    entry = _official(name)
    folder = os.path.join(cache_dir(), "downloads")
    final = os.path.join(folder, entry.file)
    part = final + ".part"
    os.makedirs(folder, exist_ok=True)
    with _locked(final + ".lock"):
        if _cached(entry, final, progress):
            return final
        _fetch(entry, part, final, progress)
        got = _sha256(part, progress)
        if got != entry.sha256:
            os.remove(part)  # a complete transfer of the wrong bytes: resuming cannot fix it
            raise HubError(f"{_url(entry)}: SHA-256 mismatch for {entry.file}: expected "
                           f"{entry.sha256}, got {got}. The download was deleted and nothing "
                           f"was cached; call again to retry, or check that the base URL "
                           f"({base_url()}, SAM_JAX_BASE_URL) serves the official file")
        # record first, then the rename that makes the final name exist: the final name never
        # exists unverified, and the record is never older than the file
        _write_atomic(final + ".sha256", f"{got}  {entry.file}\n")
        os.replace(part, final)
    return final


# ---- Hugging Face -------------------------------------------------------------------------

def _hf_download(repo: str) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise HubError(f"{repo} is a Hugging Face model; fetching it needs huggingface_hub "
                       "(pip install huggingface_hub), or download its model.safetensors and "
                       "pass that path") from None
    try:
        return hf_hub_download(repo_id=repo, filename=HF_FILE)
    except Exception as e:  # its errors differ between versions (requests / httpx based)
        raise HubError(f"could not fetch {HF_FILE} of {repo} from the Hugging Face Hub "
                       f"({type(e).__name__}: {e}). Download it yourself "
                       f"(https://huggingface.co/{repo}) and pass the file's path, or set "
                       "HF_ENDPOINT to a mirror") from e


# ---- conversion ---------------------------------------------------------------------------

def _source_of(ckpt_dir: str) -> Optional[str]:
    """The "source" field of a complete converted directory, else None."""
    if not os.path.isdir(os.path.join(ckpt_dir, "variables")):
        return None
    try:
        with open(os.path.join(ckpt_dir, "config.json")) as f:
            return str(json.load(f).get("source"))
    except (OSError, ValueError):
        return None


def _convert_into(path: str, model_type: str, source: str, out_dir: str) -> None:
    """Converts `path` to a temporary directory beside `out_dir`, then renames it into place:
    `out_dir` never holds a partial conversion."""
    from .checkpoints import load_variables, save_converted

    parent = os.path.dirname(out_dir)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
    try:
        config, variables = load_variables(path, model_type=model_type)
        save_converted(variables, config, tmp,
                       metadata={"model_type": model_type, "source": source})
        if os.path.exists(out_dir):  # a stale conversion (another source hash): set it aside
            stale = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.old-")
            os.rename(out_dir, os.path.join(stale, "old"))
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed


def _convert_once(key: str, model_type: str, is_current, fetch) -> str:
    """<cache>/converted/<key>, converted from `fetch()` -> (checkpoint path, source) unless
    the directory there is complete and `is_current(its source)`."""
    folder = os.path.join(cache_dir(), "converted")
    out_dir = os.path.join(folder, key)
    os.makedirs(folder, exist_ok=True)
    with _locked(out_dir + ".lock"):
        found = _source_of(out_dir)
        if found is not None and is_current(found):
            return out_dir
        path, source = fetch()
        _convert_into(path, model_type, source, out_dir)
    return out_dir


def converted(name: str, *, progress: bool = True) -> str:
    """The path of the converted directory for an official name or a Hugging Face id
    (<cache>/converted/<name>, "/" written "--"), downloading and converting once. Later calls
    return it without touching the network."""
    if name in HF_REPOS:
        prefix = f"safetensors:hf:{name}/{HF_FILE}@sha256:"

        def fetch_hf():
            path = _hf_download(name)
            return path, prefix + _sha256(path, progress)

        return _convert_once(name.replace("/", "--"), HF_REPOS[name],
                             lambda found: found.startswith(prefix), fetch_hf)
    entry = _official(name)
    # the source names the file and its hash, so a conversion of other bytes (an older
    # registry entry) is redone rather than reused
    source = f"pth:official:{entry.file}@sha256:{entry.sha256}"
    return _convert_once(name, entry.model_type, lambda found: found == source,
                         lambda: (download(name, progress=progress), source))


def resolve(name_or_path: str | os.PathLike) -> str:
    """What `sam_jax.load` should open: an existing path unchanged (a local folder called
    "vit_b" still loads as a path), an official name or Hugging Face id as its converted
    directory (downloaded and converted on first use), anything else unchanged."""
    text = os.fspath(name_or_path)
    if os.path.exists(text):
        return text
    if text in OFFICIAL_CHECKPOINTS or text in HF_REPOS:
        return converted(text)
    return text
