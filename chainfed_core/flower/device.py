"""What a SuperNode holds for a run: its own data, its model (streamed or in memory), its budget.

A deployed node reads its node config (``flower-supernode --node-config``):

- ``data-path``: a local CSV / JSON / JSONL / Parquet file or folder (the formats and checks of
  :mod:`chainfed_core.data_files`) holding the device's own examples. Text is tokenized with
  the run's model tokenizer; a file that already holds ``input_ids`` (and optionally
  ``attention_mask``) is used as it is. Labels are matched to the run's classes, which the
  server sends (by name, or by class id). The server sees only the example count.
  Without ``data-path`` the node takes partition ``partition-id`` of the run's global data
  set (simulation and tests).
- ``layer-store``: a layer store (:mod:`chainfed_core.layer_store`) of the run's model, built
  once per device (:func:`build_store`, ``python -m chainfed_core.flower.device``) and checked
  by sha256 on read. ChainFed then runs streamed: the node holds only its step's layers, fills
  its frozen-prefix activation cache (:class:`~chainfed_core.actcache.ActivationCache`, one
  batch in memory, the rest spilled to ``cache-dir``) by streaming the prefix once, and trains
  the window and GPO's branch from the cache. The other methods need the whole model and
  build it in memory as before.
- ``memory-gb``: the device's memory. A streamed node refuses, at its first message, a window
  whose deployed peak (:func:`~chainfed_core.memory_model.streamed_chainfed_bytes`, plus the
  process's resident set when it checks) exceeds it (:class:`MemoryBudgetError`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

import torch

from ..backbone import Backbone
from ..config import RunConfig
from ..data_files import DataError, FILE_BUILDERS, read_files, read_local_split, split_files
from ..data_labels import label_key
from ..layer_store import LayerStore, LayerStoreError, save_layer_store
from ..methods import get_method
from ..population import ClientRows
from ..rss import current_rss

STORE_RUN_FILE = "chainfed_run.json"      # beside the store's manifest: the run settings it was built for


class MemoryBudgetError(RuntimeError):
    """The node's step does not fit its ``memory-gb``."""


# ---------------------------------------------------------------------- the model
def base_backbone(config: RunConfig, num_labels: int) -> Backbone:
    """The run's model as built everywhere (seeded), without what the method adds."""
    from ..task import tiny_spec

    torch.manual_seed(config.seed)
    if config.model.name.startswith("tiny"):
        from ..tiny import tiny_backbone
        return tiny_backbone(num_labels=num_labels, seed=config.seed, **tiny_spec(config.model.name))
    from ..backbone import load_backbone
    return load_backbone(config.model, num_labels)


def _store_run(config: RunConfig, num_labels: int) -> dict:
    return {"model": config.model.name, "seed": config.seed, "num_labels": num_labels}


def build_store(config: RunConfig, num_labels: int, folder: str | Path, dtype: torch.dtype | None = None) -> LayerStore:
    """The device's layer store of the run's model (once per device; a rerun resumes)."""
    store = save_layer_store(base_backbone(config, num_labels), folder, dtype)
    mark_store(config, num_labels, folder)
    return store


def mark_store(config: RunConfig, num_labels: int, folder: str | Path) -> None:
    """Record beside the store's manifest that it holds the run's model (what :func:`open_store`
    checks): :func:`build_store` does, and so does whoever wrote the model's store another way
    (layer by layer, :func:`~chainfed_core.layer_store.write_random_store`)."""
    (Path(folder) / STORE_RUN_FILE).write_text(json.dumps(_store_run(config, num_labels)))


def open_store(config: RunConfig, num_labels: int, folder: str | Path) -> LayerStore:
    """The layer store at ``folder``; one built for another model, seed or label count is refused."""
    marker = Path(folder) / STORE_RUN_FILE
    if not marker.exists():
        raise LayerStoreError(f"node config layer-store={folder}: no {STORE_RUN_FILE}; build it with "
                              "python -m chainfed_core.flower.device build-store")
    built, wanted = json.loads(marker.read_text()), _store_run(config, num_labels)
    if built != wanted:
        raise LayerStoreError(f"node config layer-store={folder} holds {built}, the run needs {wanted}")
    return LayerStore(folder)


def streamed_model(config: RunConfig, store: LayerStore):
    """The run's model streamed from ``store``, with what the method adds (seeded as in memory).

    Without prefetch: on the CPU a streamed layer is memory-mapped and the prefetch worker only
    faults its pages in, which hides little with the store in the page cache, while the
    prefetched layer stays resident beside the one computing all through the cache fill (the
    LLaMA2-7B shape's train path, W=2, peaked at 2.08 GiB with it and 1.76 GiB without, in one
    process; ``benchmarks/supernode_llama7b.py`` measures the deployed ClientApp)."""
    from ..streaming import load_streamed

    sb = load_streamed(store, prefetch=False)
    get_method(config.method)(config, sb.num_layers, sb.family).prepare(sb)
    return sb


def check_budget(config: RunConfig, store: LayerStore, window: int, seq_len: int, budget_gb: float,
                 resident: Iterable[str] = ()) -> int:
    """The deployed peak of a ChainFed step of ``window`` layers (bytes, the process's resident
    set now included); :class:`MemoryBudgetError` if it exceeds ``budget_gb``. ``resident``:
    the store's parts the process holds already (the streamer's); the step's estimate counts
    the head and ``rest`` too, so those are counted once."""
    from ..memory_model import streamed_chainfed_bytes

    step = streamed_chainfed_bytes(store.hf_config(), window, batch_size=config.train.batch_size, seq_len=seq_len,
                                   bottleneck=config.adapter.bottleneck, optimizer=config.train.optimizer,
                                   dtype=store.manifest["dtype"]).total
    held = current_rss() - sum(store.nbytes(k) for k in set(resident) & {"head", "rest"})
    need, budget = held + step, budget_gb * 2 ** 30
    if need > budget:
        raise MemoryBudgetError(
            f"node config memory-gb={budget_gb}: a ChainFed step of window W={window} needs "
            f"{need / 2 ** 30:.3f} GB ({held / 2 ** 30:.3f} GB this process holds already besides the model + "
            f"{step / 2 ** 30:.3f} GB for the step), more than the budget; give the node more memory or "
            "run a narrower window (chain.window)")
    return need


# ---------------------------------------------------------------------- the data
def _class_ids(values, classes: list[str], where) -> torch.Tensor:
    """Raw label values as the run's class ids: a class name, or an id in range."""
    by_name = {label_key(name): i for i, name in enumerate(classes)}
    ids = []
    for v in values:
        key = label_key(v)
        cid = by_name.get(key, key if isinstance(key, int) and 0 <= key < len(classes) else None)
        if cid is None:
            raise DataError(f"{where}: label {v!r} is not one of the run's classes {classes} (or an id below "
                            f"{len(classes)})")
        ids.append(cid)
    return torch.tensor(ids, dtype=torch.long)


def _token_columns(raw, max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pre-tokenized rows, truncated and right-padded to the longest (at most ``max_length``)."""
    ids = [list(x)[:max_length] for x in raw["input_ids"]]
    masks = ([list(m)[:max_length] for m in raw["attention_mask"]] if "attention_mask" in raw.column_names
             else [[1] * len(x) for x in ids])
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)     # (N, T)
    attention = torch.zeros((len(ids), longest), dtype=torch.long)             # (N, T)
    for j, (x, m) in enumerate(zip(ids, masks)):
        input_ids[j, :len(x)], attention[j, :len(m)] = torch.tensor(x), torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": attention}


def _text_columns(texts: list[str], config: RunConfig) -> tuple[dict[str, torch.Tensor], int]:
    from transformers import AutoTokenizer

    from ..assets import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path(config.model.name))
    enc = tokenizer(texts, truncation=True, padding="max_length", max_length=config.model.max_length,
                    return_token_type_ids=False, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, tokenizer.pad_token_id or 0


def read_device_data(path: str | Path, classes: list[str], config: RunConfig) -> tuple[ClientRows, int]:
    """The device's training examples (``input_ids``, ``attention_mask``, ``label``) from a local
    file or folder (its ``train`` files), and the pad id."""
    if not Path(path).exists():
        raise DataError(f"node config data-path={path}: no such file or folder")
    files = split_files(Path(path))["train"]
    raw = read_files(FILE_BUILDERS[files[0].suffix.lower()], files) if files[0].suffix.lower() in FILE_BUILDERS \
        else None
    where = files[0] if len(files) == 1 else [str(f) for f in files]
    if raw is not None and "input_ids" in raw.column_names:
        label_column = next((c for c in ("label", "labels") if c in raw.column_names), None)
        if label_column is None:
            raise DataError(f"{where}: a pre-tokenized file needs a 'label' column, found {raw.column_names}")
        pad_id = 0
        columns, labels = _token_columns(raw, config.model.max_length, pad_id), raw[label_column]
    else:
        ds = read_local_split(files, None, where)
        (columns, pad_id), labels = _text_columns(list(ds["text"]), config), ds["label"]
    if not len(labels):
        raise DataError(f"{where}: no examples")
    columns["label"] = _class_ids(labels, classes, where)
    return ClientRows(columns, torch.arange(len(labels))), pad_id


# ---------------------------------------------------------------------- building a store on the device
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a device's layer store of a run's model.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-store", help="write the run's model as a layer store")
    build.add_argument("--config", required=True, help="the run's RunConfig JSON")
    build.add_argument("--num-labels", type=int, required=True, help="the run's number of classes")
    build.add_argument("--out", required=True, help="the store's folder (node config layer-store)")
    args = parser.parse_args(argv)
    cfg = RunConfig.from_dict(json.loads(Path(args.config).read_text()))
    store = build_store(cfg, args.num_labels, args.out)
    print(f"layer store of {cfg.model.name} (seed {cfg.seed}) in {store.folder}: "
          f"{sum(store.nbytes(k) for k in store.manifest['shards']) / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    main()
