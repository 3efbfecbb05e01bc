"""What a federated round costs on each decoder of Appendix F.2, relative to SmolLM2-135M,
measured on this machine: the basis of the cpu profiles' wall-time estimates
(:mod:`chainfed_core.instruct_sensitivity`).

Each decoder is built with random weights of its real shape (its asset's config where the
asset is catalogued, else the published ``config.json`` fields in :data:`SHAPES`), untied as
the runs untie it (:func:`chainfed_core.instruct_runs.untie_head`), in float32. On the same
rows (``batch_size`` records of ``seq_len`` random tokens, the loss on every token) it times
the project's own client step, :func:`chainfed_core.train.train_local`:

- ``full_adapters``: every layer's adapter trains (Full Adapters' step);
- ``chainfed``: ChainFed W = 2 at the chain's first window (no frozen prefix, as when the
  window's input comes from the activation cache), GPO's global branch through the later
  adapters and the head, λ = 0.2;
- ``forward``: one no-grad forward pass of the whole model over the rows (what the held-out
  loss, FOAT's profiling and the MMLU log-likelihoods cost per token).

The decoders are timed in turn, ``repeats`` times, so a busy machine slows all alike; each
ratio divides a decoder's fastest time by SmolLM2's fastest. Weights are random: the cost of
a step does not depend on their values.

    .venv/bin/python -m chainfed_core.instruct_cost     # writes results/instruct/decoder_step_cost.json
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

BASE = "smollm2-135m"
DECODERS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")
RECORD = Path("results/instruct/decoder_step_cost.json")
KINDS = ("full_adapters", "chainfed", "forward")
# The published config.json fields of the two F.2 decoders (google/gemma-3-270m; Qwen2.5-Coder-0.5B,
# whose packaged GGUF keeps a head of its own: 630 M parameters), used until their assets are catalogued.
SHAPES: dict[str, dict[str, Any]] = {
    "gemma3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
                        rope_theta=1e6, rope_local_base_freq=10000.0, hidden_activation="gelu_pytorch_tanh",
                        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                     for i in range(18)],
                        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True),
    "qwen2.5-coder-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                               max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                               use_sliding_window=False, max_window_layers=24, tie_word_embeddings=False),
}


def decoder_config(name: str):
    """The HF config of a decoder: its asset's where catalogued, else :data:`SHAPES`."""
    from .asset_catalogue import AssetError
    from .experiments import model_config
    from .model_parts import hf_config

    try:
        return model_config(name), "asset"
    except AssetError:
        if name not in SHAPES:
            raise
        return hf_config(dict(SHAPES[name])), "published config.json fields"


def random_decoder(name: str, seed: int = 0):
    """A random-weight Backbone of the decoder's shape, head untied, adapters added (bottleneck 64)."""
    from .backbone import from_model
    from .config import AdapterConfig
    from .families import detect_family
    from .instruct_runs import untie_head
    from .model_parts import build_model

    config, source = decoder_config(name)
    family = detect_family(config)
    torch.manual_seed(seed)
    bb = untie_head(from_model(build_model(config, family), family))
    bb.add_adapters(AdapterConfig(bottleneck=64))
    return bb, source


def causal_rows(n: int, seq_len: int, vocab: int, seed: int = 0):
    """``n`` unpadded rows of ``seq_len`` random token ids, the loss on every token (a Dataset)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab - 5, (n, seq_len), generator=g).tolist()     # (n, T)
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len] * n, "lm_labels": ids})


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def time_decoder(bb, rows, *, local_steps: int, batch_size: int) -> dict[str, float]:
    """Seconds of one call of each kind (:data:`KINDS`) on ``bb``: a step is ``/ local_steps``."""
    from .config import TrainConfig
    from .methods import plan_for
    from .schedule import stage_at
    from .train import batches, train_local

    L = bb.num_layers
    cfg = TrainConfig(optimizer="adamw", lr=1e-4, batch_size=batch_size, local_steps=local_steps)
    chain = plan_for("chainfed", L, stage_at(0, L, 0, 2, 1), lam=0.2)
    batch = next(batches(rows, len(rows), shuffle=False))

    def forward():
        with torch.no_grad():
            bb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    return {"full_adapters": _timed(lambda: train_local(bb, rows, plan_for("full_adapters", L), cfg)) / local_steps,
            "chainfed": _timed(lambda: train_local(bb, rows, chain, cfg)) / local_steps,
            "forward": _timed(forward)}


def measure(names=DECODERS, *, batch_size: int = 2, seq_len: int = 192, local_steps: int = 2,
            repeats: int = 2) -> dict[str, Any]:
    """Each decoder's fastest seconds per kind over ``repeats`` turns, and its ratio to :data:`BASE`."""
    if BASE not in names:
        raise ValueError(f"names: the ratios need {BASE!r} among them, got {list(names)}")
    models = {n: random_decoder(n) for n in names}
    rows = {n: causal_rows(batch_size * local_steps, seq_len, bb.model.config.vocab_size)
            for n, (bb, _) in models.items()}
    seconds: dict[str, dict[str, list[float]]] = {n: {k: [] for k in KINDS} for n in names}
    for _ in range(repeats):
        for n, (bb, _) in models.items():
            for k, s in time_decoder(bb, rows[n], local_steps=local_steps, batch_size=batch_size).items():
                seconds[n][k].append(s)
    best = {n: {k: min(v) for k, v in kinds.items()} for n, kinds in seconds.items()}
    return {"what": f"seconds of one client step (train_local, {batch_size} x {seq_len} tokens, AdamW) and of one "
                    f"no-grad forward of the same rows, random weights of each decoder's shape, float32, "
                    f"{torch.get_num_threads()} thread(s); fastest of {repeats} turns",
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "shape_source": {n: src for n, (_, src) in models.items()},
            "layers": {n: bb.num_layers for n, (bb, _) in models.items()},
            "parameters": {n: sum(p.numel() for p in bb.model.parameters()) for n, (bb, _) in models.items()},
            "seconds": seconds, "best": best,
            "ratio_to_base": {n: {k: best[n][k] / best[BASE][k] for k in KINDS} for n in names}}


def load(path: str | Path = RECORD) -> dict[str, Any] | None:
    """The committed measurement, or None where it was never made."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def estimate_seconds(config, base: dict, cost: dict, mmlu_questions: int | None = None) -> float:
    """A run's wall time on this machine, from a measured run of the same method on SmolLM2
    (``base``, a record: Table 3's) scaled by the decoder's measured ratios (``cost``, from
    :func:`measure`): its training by the step ratio, rounds and local steps; the rest (loading,
    FOAT, held-out loss) and MMLU by the forward ratio (MMLU also by its questions)."""
    name = config.model.name
    if name not in cost["ratio_to_base"]:
        raise ValueError(f"ModelConfig.name: no measured step cost for {name!r}; measured: {list(cost['ratio_to_base'])}")
    ratio = cost["ratio_to_base"][name]
    kind = "chainfed" if config.method == "chainfed" else "full_adapters"
    if base["config"]["method"] != config.method:
        raise ValueError(f"base: a {base['config']['method']} record cannot time a {config.method} run")
    history, evals = base["history"], base["final_eval"]
    train = sum(m.get("seconds_train", 0.0) for m in history)
    final = sum(s.get("seconds", 0.0) for s in evals.values() if isinstance(s, dict))
    mmlu, asked = evals["mmlu"], len(evals["mmlu"]["predictions"])
    steps = config.train.local_steps / base["config"]["train"]["local_steps"]
    return (train * config.fed.rounds / len(history) * steps * ratio[kind]
            + (base["wall_s"] - train - final) * ratio["forward"]
            + mmlu["seconds"] * ratio["forward"] * (mmlu_questions or asked) / asked)


def main() -> None:
    torch.set_num_threads(1)
    result = measure()
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ratio_to_base"], indent=1))


if __name__ == "__main__":
    main()
