"""benchmarks/supernode_llama7b.py in seconds: bad arguments are one-line errors, and the local
HF model folder the ServerApp loads holds the very weights the device streams from its store."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import supernode_llama7b as bench  # noqa: E402

from chainfed_core.model_parts import hf_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("argv, message", [
    (["--layers", "2"], "--layers must exceed --window (2) so a prefix streams, got 2"),
    (["--window", "0"], "--window must be at least 1, got 0"),
    (["--budget-gb", "0"], "--budget-gb must be positive, got 0.0"),
    (["--seq-len", "1"], "--seq-len must be 2..2048"),
    (["--seq-len", "x"], "argument --seq-len: invalid int value: 'x'"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err


def test_the_server_model_folder_holds_the_store_weights_and_the_store_is_reused(tmp_path):
    from chainfed_core.backbone import load_backbone
    from chainfed_core.config import ModelConfig

    config = hf_config(dict(model_type="llama", hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                            num_key_value_heads=2, intermediate_size=64, vocab_size=100, tie_word_embeddings=False))
    built = bench.ensure_store(tmp_path / "store", config)
    assert not built["reused"] and bench.ensure_store(tmp_path / "store", config)["reused"]
    folder = bench.model_folder(built["store"], tmp_path / "model", config)
    model = load_backbone(ModelConfig(name=str(folder), dtype="bfloat16")).model
    named = dict(model.named_parameters())
    for key in ("embed", "layer.2", "head"):
        for name, tensor in built["store"].load(key).items():
            assert torch.equal(named[name].to(tensor.dtype), tensor), name
