"""Benchmark harness: the paper's model shapes with random weights, their measured peak
memory and their step times streamed vs in memory (notebooks obs2_3, appG; benchmarks/).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from .config import AdapterConfig, TrainConfig
from .layer_store import MANIFEST, LayerStore, write_random_store
from .memory_meter import MemoryMeter, MemoryReport, metered_training
from .model_parts import hf_config
from .schedule import stage_at
from .streaming import load_streamed

# HF config fields of the paper's models (random weights of these shapes stand in for them).
# MiniLM-L6 plays the paper's DistilBERT role, MPNet-base its BERT-base role.
SHAPES: dict[str, dict[str, Any]] = {
    "minilm-l6": dict(model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, vocab_size=30522, num_labels=2),
    "mpnet-base": dict(model_type="mpnet", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, vocab_size=30527, num_labels=2),
    "roberta-large": dict(model_type="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096, vocab_size=50265, max_position_embeddings=514,
                          pad_token_id=1, num_labels=2),
    "llama2-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                      tie_word_embeddings=False),
    "llama2-13b": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                       tie_word_embeddings=False),
}


def random_token_dataset(n: int, seq_len: int, vocab: int, num_labels: int = 2, seed: int = 0):
    """``n`` unpadded rows of ``seq_len`` random token ids with random labels (a tokenized Dataset)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, seq_len), generator=g)      # (n, T)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n,
                              "label": torch.randint(0, num_labels, (n,), generator=g).tolist()})


def measure_peak(config_like, method: str, window: int = 1, *, batch_size: int, seq_len: int, folder,
                 bottleneck: int = 64, streamed: bool = False, window_start: int = 0,
                 cached: bool = False) -> MemoryReport:
    """The meter's peak over two steps of ``method`` (``no_ft``: two inference batches) on a
    random-weight model of a config's shape, float32 with SGD: the setting
    :func:`~chainfed_core.memory_model.peak_training_bytes` predicts for the same arguments.

    The weights are written once as a layer store in ``folder`` (reused when it is there);
    ``streamed`` ChainFed reads them part by part with prefetch, otherwise all are resident;
    ``cached`` (with ``streamed``) fills the frozen-prefix activation cache first, one batch
    in memory and the rest on disk, and measures the window's steps fed from it, as deployed
    (:func:`~chainfed_core.memory_model.streamed_chainfed_bytes`).
    """
    from .methods import get_method, plan_for
    from .train import evaluate

    config = hf_config(config_like)
    folder = Path(folder)
    store = LayerStore(folder) if (folder / MANIFEST).exists() else write_random_store(config, folder)
    bb = load_streamed(store, prefetch=streamed, resident="streamed" if streamed else "all")
    if get_method(method).adapters:
        bb.add_adapters(AdapterConfig(bottleneck=bottleneck))
    L = bb.num_layers
    stage = stage_at(window_start, L, 0, window, 1) if get_method(method).uses_chain else None
    plan = plan_for(method, L, stage, lam=0.1)
    data = random_token_dataset(2 * batch_size, seq_len, config.vocab_size, getattr(config, "num_labels", 2))
    prefix = cache = None
    if cached:
        from .actcache import ActivationCache

        one_batch = batch_size * seq_len * config.hidden_size * 4
        cache = ActivationCache(bb, max_memory_bytes=one_batch, folder=folder / "cache")
        prefix = cache.prefix("client", data, plan)          # filled before the measured steps
    if streamed:
        bb.follow(plan, cached=cached)
    try:
        if not plan.trains_anything:                   # No-FT: the peak of inference
            with MemoryMeter(bb) as meter:
                evaluate(bb, data, batch_size=batch_size)
            return meter.report()
        report, _ = metered_training(bb, data, plan, TrainConfig(batch_size=batch_size, local_steps=2),
                                     prefix=prefix, cache=cache)
        return report
    finally:
        bb.streamer.close()


def step_times(store: LayerStore | str | os.PathLike, window: int, dataset, *, repeats: int = 2,
               local_steps: int = 2, compute_dtype: torch.dtype | None = torch.float32) -> dict:
    """Seconds per local round of ChainFed's last window, uncached (the prefix is streamed too):
    streamed with prefetch, streamed without, and every part resident (paper Appendix G.2).

    The three models are timed in turn ``repeats`` times, so a busy machine slows all alike;
    the ratios use each setting's fastest round.
    """
    from .methods import plan_for
    from .train import train_local

    settings = {"prefetch": dict(prefetch=True), "no_prefetch": dict(prefetch=False),
                "in_memory": dict(prefetch=False, resident="all")}
    models = {k: load_streamed(store, compute_dtype=compute_dtype, **kw) for k, kw in settings.items()}
    L = models["prefetch"].num_layers
    plan = plan_for("chainfed", L, stage_at(0, L, L - window, window, 1), lam=0.2)
    cfg = TrainConfig(optimizer="adamw", lr=1e-4, batch_size=1, local_steps=local_steps)
    for sb in models.values():
        sb.add_adapters(AdapterConfig())
    times: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(repeats):
        for key, sb in models.items():
            if key != "in_memory":
                sb.follow(plan)
            started = time.perf_counter()
            train_local(sb, dataset, plan, cfg)
            times[key].append(time.perf_counter() - started)
    for sb in models.values():
        sb.streamer.close()
    best = {k: min(v) for k, v in times.items()}
    return {"seconds": times, "prefetch_over_in_memory": best["prefetch"] / best["in_memory"],
            "prefetch_over_no_prefetch": best["prefetch"] / best["no_prefetch"]}
