"""The layer store: its manifest, checked reads, resumable writes and the safetensors reader."""

import errno
import json
import os
import re

import pytest
import torch
from safetensors.torch import load, load_file, save
from transformers import AutoModelForSequenceClassification

from chainfed_core import layer_store
from chainfed_core.backbone import from_model
from chainfed_core.layer_store import (FORMAT, MANIFEST, LayerStore, LayerStoreError, ShardChecksumError,
                                       save_layer_store, tensors_of, write_random_store)
from chainfed_core.methods import plan_for
from chainfed_core.streaming import load_streamed
from chainfed_core.tiny import tiny_backbone, tiny_batch, tiny_config, tiny_dataset


def test_corrupted_and_missing_shards_are_named(tmp_path):
    bb = tiny_backbone("bert", num_layers=3, hidden=32)
    store = save_layer_store(bb, tmp_path)
    path = store.path("layer.1")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match=r"shard layer\.1 .*corrupted"):
        LayerStore(tmp_path, verify="always").load("layer.1")
    with pytest.raises(ShardChecksumError, match=r"shard layer\.1"):
        LayerStore(tmp_path, verify="once").load("layer.1")   # never verified yet in this process
    sb = load_streamed(tmp_path)
    sb.follow(plan_for("full_adapters", 3))
    with pytest.raises(ShardChecksumError, match=r"layer\.1"):
        sb.forward(tiny_dataset(2, 6)[:2] | {"input_ids": torch.ones(2, 6, dtype=torch.long),
                                             "attention_mask": torch.ones(2, 6, dtype=torch.long)})
    store.path("layer.2").unlink()
    with pytest.raises(LayerStoreError, match=r"shard layer\.2 missing"):
        LayerStore(tmp_path).load("layer.2")


def test_verify_once_skips_rehashing(tmp_path):
    store = save_layer_store(tiny_backbone("bert", num_layers=2, hidden=32), tmp_path)
    first = LayerStore(tmp_path, verify="once")
    first.load("layer.0")
    assert first.hash_seconds > 0
    again = LayerStore(tmp_path, verify="once")
    again.load("layer.0")
    assert again.hash_seconds == 0
    assert store.nbytes("layer.0") == again.read_bytes


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(LayerStoreError, match="not writable"):
        save_layer_store(tiny_backbone("bert", num_layers=2, hidden=32), blocker / "store")


def test_full_disk_keeps_written_shards_and_resumes(tmp_path, monkeypatch):
    bb = tiny_backbone("bert", num_layers=3, hidden=32)
    real_write, real_fsync, calls = layer_store.atomic_write_bytes, os.fsync, []

    def counting(path, data):
        calls.append(path.name)
        real_write(path, data)

    def fsync(fd):                                       # the disk fills up in the first write of layer 1
        if calls[-1] == "layer_001.safetensors" and calls.count(calls[-1]) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(layer_store, "atomic_write_bytes", counting)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(LayerStoreError, match=r"shard layer\.1 .*no space left"):
        save_layer_store(bb, tmp_path)
    written = json.loads((tmp_path / "manifest.json").read_text())["shards"]
    assert set(written) == {"embed", "head", "rest", "layer.0"}
    assert not list(tmp_path.glob(".*"))                 # no temporary file left behind
    before = (tmp_path / "layer_000.safetensors").stat().st_mtime_ns
    save_layer_store(bb, tmp_path)                       # retry: resumes, keeps what was written
    assert (tmp_path / "layer_000.safetensors").stat().st_mtime_ns == before
    assert calls.count("layer_000.safetensors") == 1
    LayerStore(tmp_path, verify="always")


def test_llama_store_keeps_its_frozen_head_in_the_store_dtype(tmp_path):
    write_random_store(tiny_config("llama", num_layers=1, hidden=32), tmp_path / "llama", dtype=torch.bfloat16)
    write_random_store(tiny_config("bert", num_layers=1, hidden=32), tmp_path / "bert", dtype=torch.bfloat16)
    llama = LayerStore(tmp_path / "llama").load("head")
    bert = LayerStore(tmp_path / "bert").load("head")
    assert {t.dtype for t in llama.values()} == {torch.bfloat16}               # norm + LM head, frozen
    assert {t.dtype for t in bert.values()} == {torch.float32}                 # a classifier trains
    gemma3 = tiny_config("gemma3", num_layers=1, hidden=32)                 # model_type gemma3_text, family gemma3
    assert write_random_store(gemma3, tmp_path / "gemma3", dtype=torch.bfloat16).family == "gemma3"


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_store_records_pooling_and_streams_the_same_logits(pooling, tmp_path):
    bb = tiny_backbone("bert", num_layers=3, hidden=32, pooling=pooling)
    assert save_layer_store(bb, tmp_path).pooling == pooling
    batch = tiny_batch(4, 10)
    with torch.no_grad():
        assert torch.equal(load_streamed(tmp_path).forward(batch), bb.forward(batch))
    other = {"cls": "mean", "mean": "cls"}[pooling]
    with pytest.raises(LayerStoreError, match=f"written with pooling '{pooling}', not '{other}'"):
        load_streamed(tmp_path, pooling=other)


def test_store_records_the_attention_implementation(tmp_path):
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_layers=2), attn_implementation="eager")
    bb = from_model(model, "bert")
    assert save_layer_store(bb, tmp_path).attn_implementation == "eager"
    sb = load_streamed(tmp_path)
    assert sb.config._attn_implementation == "eager"
    batch = tiny_batch(4, 10)
    with torch.no_grad():
        assert torch.equal(sb.forward(batch), bb.forward(batch))


def test_random_store_records_its_pooling(tmp_path):
    store = write_random_store(tiny_config("bert", num_layers=1, hidden=32), tmp_path, pooling="mean")
    assert store.pooling == load_streamed(tmp_path).pooling == "mean"


def test_malformed_or_foreign_manifest_is_named(tmp_path):
    save_layer_store(tiny_backbone("bert", num_layers=1, hidden=32), tmp_path)
    path = tmp_path / MANIFEST
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(manifest)[:-5])
    with pytest.raises(LayerStoreError, match=f"^layer store manifest {re.escape(str(path))} is not valid JSON"):
        LayerStore(tmp_path)
    path.write_text(json.dumps({**manifest, "format": "chainfed-layer-store/1"}))
    with pytest.raises(LayerStoreError, match=f"unknown format 'chainfed-layer-store/1' in {re.escape(str(path))}"):
        LayerStore(tmp_path)
    path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "pooling"}))
    with pytest.raises(LayerStoreError, match=r"lacks \['pooling'\]"):
        LayerStore(tmp_path)
    path.write_text(json.dumps({**manifest, "task": "causal_lm"}))
    with pytest.raises(LayerStoreError, match="task 'causal_lm' does not match family 'bert'"):
        LayerStore(tmp_path)
    assert manifest["format"] == FORMAT


def test_header_reader_matches_safetensors():
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16), "f16": torch.randn(2, 2).half(),
               "f64": torch.randn(3, dtype=torch.float64), "i64": torch.arange(6).view(2, 3),
               "i32": torch.arange(3, dtype=torch.int32), "i16": torch.arange(5, dtype=torch.int16),
               "i8": torch.arange(-2, 1, dtype=torch.int8), "u8": torch.arange(5, dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.empty(0, 4)}
    data = save(tensors, metadata={"written_by": "test"})
    got, ref = tensors_of(torch.frombuffer(bytearray(data), dtype=torch.uint8)), load(data)
    assert sorted(got) == sorted(ref) == sorted(tensors)
    for name, tensor in ref.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape and torch.equal(got[name], tensor)


def test_store_shards_are_safetensors_files(tmp_path):
    store = save_layer_store(tiny_backbone("llama", num_layers=2, hidden=32), tmp_path, dtype=torch.bfloat16)
    for key in store.manifest["shards"]:
        ref = load_file(store.path(key))
        got = store.load(key)
        assert sorted(got) == sorted(ref) == store.manifest["shards"][key]["tensors"]
        assert all(got[n].dtype == ref[n].dtype and torch.equal(got[n], ref[n]) for n in ref)
