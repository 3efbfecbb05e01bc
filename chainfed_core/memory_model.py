"""The analytic memory model: a client's peak tensor bytes predicted from a model config.

:func:`peak_training_bytes` predicts what :class:`~chainfed_core.memory_meter.MemoryMeter`
measures, by its categories, for shapes that cannot run here (LLaMA2-7B/13B): the
weights from the parts' exact element counts (:func:`part_sizes`), the activations from
what autograd saves per token and layer. :func:`client_peak_bytes` applies it to a
federated client as deployed (memory-aware selection, result tables).

What :func:`peak_training_bytes` assumes: the first trained layer of the adapter methods
saves only its adapter's activations because its input needs no gradient; under FFT every
layer saves its inputs for its weight gradients. A causal LM's head (final norm and LM head)
is frozen, so linear probing a decoder trains nothing and its peak is the weights; a head tied
to the token embeddings counts as the frozen copy of its own that the runs give it. What
differs between families (causal LM or classifier, RMSNorm-gated or LayerNorm layers, Gemma's
extra norms, fused projections, masks per attention type, rotary tables, eager attention) is
read from the config as :class:`FamilyTraits`; tests/test_memory.py meters every family. A
causal LM's loss holds, per branch (GPO's global branch is a second), the logits and their
log-softmax, and its backward two logits-sized gradients: where the vocabulary is large
(49,152 tokens on SmolLM2's 576 wide states) these tensors are most of a step's activations.
The backward's peak is at the loss or later at a layer, not both at once (FFT, whose layers'
weight gradients form from the loss's backward on, counts both). The
gradients of a step are freed only after the next step's forward, so gradients, optimizer
state and activations are live together. The model covers tensor bytes, as
:class:`~chainfed_core.memory_meter.MemoryMeter` counts them; the process adds the runtime
and allocator slack (:func:`~chainfed_core.rss.measure_rss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .backbone import from_model
from .families import detect_family
from .memory_meter import CATEGORIES
from .memory_traits import FamilyTraits, as_deployed, family_traits
from .model_parts import build_model, hf_config, part_tensors

__all__ = ["FamilyTraits", "MemoryEstimate", "STEP_KINDS", "client_peak_bytes", "family_traits", "part_sizes",
           "peak_training_bytes", "prefix_fill_bytes", "streamed_chainfed_bytes"]


@dataclass
class MemoryEstimate:
    """Predicted peak bytes of adapter training, by the meter's categories."""
    frozen_weights: int
    trainable: int
    gradients: int
    optimizer_state: int
    activations: int
    cache: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(getattr(self, c) for c in CATEGORIES)

    def to_dict(self) -> dict[str, Any]:
        return {**{c: getattr(self, c) for c in CATEGORIES}, "total": self.total, "notes": self.notes}


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# The kinds of step the model predicts, named after the method whose step each is; a method
# names its kind in ``Method.memory_shape`` (chainfed_core.methods).
STEP_KINDS = ("full_adapters", "chainfed", "fft", "linear_probe", "no_ft")


def part_sizes(config_like) -> dict[str, int]:
    """Parameter (and buffer) element counts of one layer, the embeddings, the head and the rest,
    counted exactly on a model built on the meta device (no memory, any size); a tied LM head
    counts as its own copy (:func:`~chainfed_core.memory_traits.as_deployed`)."""
    config = as_deployed(hf_config(config_like))
    family = detect_family(config)
    with torch.device("meta"):
        model = build_model(config, family)
    parts = part_tensors(model, from_model(model, family))
    sizes = {key: sum(t.numel() for t in ts.values()) for key, ts in parts.items()}
    return {"embed": sizes["embed"], "head": sizes["head"], "rest": sizes["rest"],
            "layer": sizes["layer.0"], "num_layers": sum(k.startswith("layer.") for k in sizes)}


def _dims(config) -> dict[str, int]:
    """Widths the activation counts need: hidden H, intermediate I, heads, KV heads, head dim,
    the query width Q (heads x head dim: H but for Gemma's wider heads), vocab V, labels K."""
    hidden = int(getattr(config, "hidden_size", None) or config.dim)
    heads = int(getattr(config, "num_attention_heads", None) or config.n_heads)
    inter = int(getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None)
                or getattr(config, "n_inner", None) or 4 * hidden)           # GPT-2: n_inner, else 4H
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return {"H": hidden, "I": inter, "heads": heads, "kv": kv, "head_dim": head_dim, "Q": heads * head_dim,
            "V": int(config.vocab_size), "K": int(getattr(config, "num_labels", 2))}


def _layer_activation_elements(t: FamilyTraits, d: dict[str, int], seq_len: int, bottleneck: int) -> int:
    """Elements autograd saves per token for one layer whose input needs a gradient, adapter included.

    LayerNorm layers (encoders with SDPA, GPT-2): q, k, v, attention output (4H) and
    log-sum-exp (heads); the inputs of both LayerNorms (2H) with their mean and rstd (4); the
    GELU input (I); the adapter's input (H) and bottleneck activation (r).
    MPNet (eager attention): q, k, v (3H), softmax probabilities (heads * T), then as above.
    Gated decoders (LLaMA's layer, SDPA): the RMSNorm inputs (2H; Gemma's four: 4H) with their
    rstd; q (Q), k and v (2 * kv * head_dim), log-sum-exp (heads), attention output (Q); Gemma3's
    q and k norms (their inputs and rstd); gate, up and activation outputs (3I); adapter (H + r).
    A decoder with eager attention saves its probabilities (heads * T) instead of the log-sum-exp.
    """
    H, I, r, Q = d["H"], d["I"], bottleneck, d["Q"]
    if t.gated:
        kv_width = d["kv"] * d["head_dim"]
        norms = t.layer_norms * (H + 1)
        if t.qk_norm:
            norms += Q + kv_width + d["heads"] + d["kv"]
        attention = d["heads"] * seq_len if t.eager else d["heads"]
        fused = Q + kv_width if t.fused_qkv else 0
        return norms + 2 * Q + 2 * kv_width + fused + attention + 3 * I + H + r
    if t.eager:
        return 6 * H + d["heads"] * seq_len + t.mlp_saves * I + r + 4
    return 7 * H + d["heads"] + t.mlp_saves * I + r + 4


def _fft_layer_activation_elements(t: FamilyTraits, d: dict[str, int], seq_len: int) -> int:
    """Per-token elements saved by one layer whose own weights train (no adapter).

    As :func:`_layer_activation_elements` without the adapter (H + r), plus the inputs the
    trainable projections keep for their weight gradients that are not saved already: the
    two normalisation outputs (2H) and the activation output feeding the down projection (I);
    Gemma's two further norms (post-attention, post-feed-forward) and its q / k norms, whose
    weights now train, keep their normalised inputs too.
    """
    H = d["H"]
    extra = (t.layer_norms - 2) * 2 * H + (d["Q"] + d["kv"] * d["head_dim"] if t.qk_norm else 0)
    return _layer_activation_elements(t, d, seq_len, 0) - H + 2 * H + d["I"] + extra


def _inference_elements(t: FamilyTraits, d: dict[str, int], seq_len: int) -> int:
    """Per-token elements alive at the widest point of one layer's forward under ``no_grad``,
    its input included: the attention block (input, q, k, v, attention output, its reshaped
    copy and the projection) or the feed-forward block (input, normalised input, the up
    projection and its activation; a gated decoder's gate, up and their product)."""
    H, I, Q = d["H"], d["I"], d["Q"]
    if t.gated:
        return max(3 * H + 3 * Q + 4 * d["kv"] * d["head_dim"], 3 * H + 3 * I)
    attention = 7 * H + (2 * d["heads"] * seq_len if t.eager else 0)   # eager scores, probabilities
    return max(attention, 3 * H + max(2, t.mlp_saves) * I)


def peak_training_bytes(model_config_like, method: str,
                        window: int = 1, batch_size: int = 8, seq_len: int = 128, dtype: str = "float32",
                        compute_dtype: str | None = None, bottleneck: int = 64,
                        optimizer: Literal["sgd", "adamw"] = "sgd", streamed: bool = False,
                        cached: bool = False, cache_bytes: int = 0, gpo: bool = True,
                        window_start: int = 0) -> MemoryEstimate:
    """Predicted peak tensor bytes of one client's training step (or, for ``no_ft``, inference).

    Args:
        model_config_like: a HF config or a dict with ``model_type`` and the config's fields
            (``hidden_size``, ``num_hidden_layers``, ``intermediate_size``, ...).
        method: one of :data:`STEP_KINDS`: ``"full_adapters"`` (every layer's adapter, end to
            end), ``"chainfed"`` (a window of ``window`` adapters after a frozen prefix),
            ``"fft"`` (every layer's own weights train, end to end, no adapters),
            ``"linear_probe"`` (the head trains on a forward-only pass through every layer)
            or ``"no_ft"`` (one forward pass of a batch, nothing trains).
        window: W, the number of adapters trained together (chainfed).
        batch_size, seq_len: tokens per step are ``batch_size * seq_len``.
        dtype: storage dtype of the frozen weights (and of FFT's trainable layer weights,
            their gradients and optimizer state); ``compute_dtype`` that of activations
            (default: ``dtype``). Adapters and classification heads are float32.
        bottleneck: adapter size r. optimizer: ``"sgd"`` (momentum: one state tensor per
            parameter) or ``"adamw"`` (two).
        streamed: chainfed reads layers from a layer store: only the window, the head and
            (when the prefix is computed, not cached) the embeddings and one prefetched part
            are resident; otherwise every weight is. Other methods keep every weight.
        cached: the window's input comes from the activation cache (no prefix forward);
            ``cache_bytes`` is the part of the cache held in memory (chainfed only).
        gpo: chainfed's global branch runs the later adapters and the head a second time.
        window_start: first layer of the window; the default 0 leaves the most later
            adapters to GPO's global branch (the largest chainfed peak).

    What the estimate assumes is in the module docstring.
    """
    if method not in STEP_KINDS:
        raise ValueError(f"method: {method!r} is not one of {list(STEP_KINDS)}")
    if (streamed or cached) and method != "chainfed":
        raise ValueError(f"streamed/cached: only 'chainfed' streams layers or caches its prefix, not {method!r}")
    config = as_deployed(hf_config(model_config_like))
    traits = family_traits(config)
    sizes = part_sizes(config)
    d = _dims(config)
    L = sizes["num_layers"]
    if not 1 <= window <= L:
        raise ValueError(f"window: W={window} must lie in 1..{L}")
    cb = _BYTES[compute_dtype or dtype]
    weights = _weight_bytes(method, traits, sizes, d["H"], window, _BYTES[dtype], bottleneck, optimizer,
                            streamed, cached)
    if method in ("no_ft", "linear_probe"):
        acts = _inference_activation_bytes(method, traits, d, batch_size, seq_len, cb)
    else:
        acts = _training_activation_bytes(method, traits, d, L, window, window_start, batch_size, seq_len,
                                          bottleneck, cb, gpo)
        if cached and cache_bytes:
            acts -= batch_size * seq_len * d["H"] * cb       # the window's input is the cache's batch, counted there
    return MemoryEstimate(**weights, activations=int(acts), cache=int(cache_bytes if cached else 0),
                          notes={"family": traits.family, "num_layers": L, "window": window, "method": method,
                                 "streamed": streamed, "cached": cached, "batch_size": batch_size,
                                 "seq_len": seq_len, "dtype": dtype, "compute_dtype": compute_dtype or dtype})


def _head_trains(method: str, t: FamilyTraits) -> bool:
    """A classification head is float32 and trains (frozen under no_ft); an LM head is frozen."""
    return not t.causal_lm and method != "no_ft"


def _weight_bytes(method: str, t: FamilyTraits, sizes: dict[str, int], H: int, window: int, wb: int, r: int,
                  optimizer: str, streamed: bool, cached: bool) -> dict[str, int]:
    """Frozen and trainable weights, gradients and optimizer state (``wb``: bytes per frozen weight)."""
    causal = t.causal_lm
    head_trains = _head_trains(method, t)
    L = sizes["num_layers"]
    if method == "chainfed" and streamed:
        prefetch = 0 if cached else sizes["embed"]      # next step's first part, read during the window
        frozen = (sizes["rest"] + window * sizes["layer"] + prefetch) * wb
    else:
        frozen = (sizes["embed"] + sizes["rest"] + L * sizes["layer"]) * wb
    frozen += 0 if head_trains else sizes["head"] * (wb if causal else 4)
    adapter_params = 2 * H * r + H + r if method in ("full_adapters", "chainfed") else 0
    head_trainable = sizes["head"] * 4 if head_trains else 0
    trainable = L * adapter_params * 4 + head_trainable
    if method == "fft":                                  # the layers' own weights move to trainable
        frozen -= L * sizes["layer"] * wb
        trainable += L * sizes["layer"] * wb
    trained_adapters = {"full_adapters": L, "chainfed": window}.get(method, 0)
    grads = trained_adapters * adapter_params * 4 + head_trainable
    grads += L * sizes["layer"] * wb if method == "fft" else 0
    opt = grads * (2 if optimizer == "adamw" else 1)
    return {"frozen_weights": int(frozen), "trainable": int(trainable), "gradients": int(grads),
            "optimizer_state": int(opt)}


def _mask_bytes(t: FamilyTraits, d: dict[str, int], B: int, T: int, cb: int) -> int:
    """The attention mask (B, 1, T, T) of each attention type, shared by the layers of that type
    (a full and a sliding-window one where layers differ), and MPNet's relative position bias."""
    bias = B * d["heads"] * T * T * cb if t.family == "mpnet" else 0
    return t.mask_types * B * T * T * cb + bias


def _inference_activation_bytes(method: str, t: FamilyTraits, d: dict[str, int], B: int, T: int, cb: int) -> int:
    """Activations of a forward-only step (no_ft, linear_probe) in compute-dtype bytes ``cb``."""
    if not (_head_trains(method, t) or method == "no_ft"):
        return 0                                         # a causal LM's linear probe never runs a step
    H = d["H"]
    acts = B * T * _inference_elements(t, d, T) * cb + _mask_bytes(t, d, B, T, cb)
    acts += B * T * d["V"] * (cb + 4) if t.causal_lm else B * H * 4 * 4   # logits and log-softmax; pooled
    if method == "linear_probe":
        acts += B * T * H * cb                           # the last step's output, held until the next prefix returns
    return acts


def _training_activation_bytes(method: str, t: FamilyTraits, d: dict[str, int], L: int, window: int,
                               window_start: int, B: int, T: int, r: int, cb: int, gpo: bool) -> int:
    """Activations of a training step (fft, full_adapters, chainfed) in compute-dtype bytes ``cb``."""
    H = d["H"]
    if method == "fft":
        saved = L * _fft_layer_activation_elements(t, d, T)
    else:
        per_token = _layer_activation_elements(t, d, T, r)
        trained = L if method == "full_adapters" else window
        saved = (trained - 1) * per_token + (H + r)        # first trained layer: its adapter only
    subsequent = 0 if method != "chainfed" or not gpo else max(L - window_start - window, 0)
    saved += subsequent * r                                  # global branch through later frozen adapters
    acts = B * T * saved * cb + _mask_bytes(t, d, B, T, cb)
    acts += B * T * H * cb * 2                               # window input and the layer output in flight
    layer_backward = B * T * (d["I"] + 3 * H) * cb           # one layer's backward working set
    if not t.causal_lm:
        return acts + B * H * 4 * 4 + layer_backward         # pooled features and their gradients
    acts += t.rotary_sets * 2 * T * d["head_dim"] * cb       # rotary cos / sin (one pair per table)
    branches, V = (2 if subsequent else 1), d["V"]
    acts += B * T * (H + 1) * 4 * branches                   # final RMSNorm input and rstd
    head = B * T * V * ((cb + 4) + (cb if t.logit_cap else 0)) * branches   # logits, log-softmax (capped logits)
    head_backward = B * (T - 1) * V * (4 + cb)               # the loss's backward: log-softmax and logits gradients
    if method == "fft":          # its layers' weight gradients form from the loss's backward on: both sets counted
        return acts + head + head_backward + layer_backward
    # the backward's peak: at the loss, or later at a layer, the local logits (returned with the loss) still held
    return acts + max(head + head_backward, B * T * V * cb + layer_backward)
    return acts


def client_peak_bytes(model_config_like, method: str, window: int = 1, *, batch_size: int, seq_len: int,
                      bottleneck: int = 64, optimizer: Literal["sgd", "adamw"] = "sgd",
                      dtype: str = "float32") -> MemoryEstimate:
    """Peak memory of one federated client running the registered ``method`` as it is deployed
    (:meth:`chainfed_core.methods.Method.peak_bytes`, which says how the method's step maps
    onto :func:`peak_training_bytes`).

    The one estimate behind memory-aware client selection, ``fed.window_from_memory`` and
    the peak memory column of the result tables. ChainFed clients are taken as deployed
    (:func:`streamed_chainfed_bytes`: layers streamed, the window fed from the activation
    cache): the paper's memory claim is for such clients, so eligibility reflects ChainFed as
    deployed even though the in-process simulator keeps every layer in memory. Every other
    built-in method holds the whole model.
    """
    from .methods import get_method
    return get_method(method).peak_bytes(hf_config(model_config_like), window, batch_size=batch_size,
                                         seq_len=seq_len, bottleneck=bottleneck, optimizer=optimizer, dtype=dtype)


def prefix_fill_bytes(model_config_like, batch_size: int = 8, seq_len: int = 128, dtype: str = "float32",
                      compute_dtype: str | None = None, bottleneck: int = 64, cache_bytes: int = 0) -> MemoryEstimate:
    """Peak tensor bytes of a streamed ChainFed client filling its frozen-prefix activation cache.

    Once per window position the prefix runs forward only, one layer at a time with the next
    one prefetched (two layers resident), the token embeddings gathered row by row from the
    memory-mapped layer store (a batch's rows, B x T x H, not the table: the rest of the
    mapped file stays on disk); every adapter and the head stay resident (they are trained and
    exchanged); the cache holds ``cache_bytes`` in memory and spills the rest to disk.
    """
    config = as_deployed(hf_config(model_config_like))
    traits, sizes, d = family_traits(config), part_sizes(config), _dims(config)
    wb, cb = _BYTES[dtype], _BYTES[compute_dtype or dtype]
    B, T, H, L = batch_size, seq_len, d["H"], sizes["num_layers"]
    head_trains = _head_trains("chainfed", traits)
    frozen = (sizes["rest"] + 2 * sizes["layer"]) * wb + B * T * H * wb
    frozen += 0 if head_trains else sizes["head"] * wb
    trainable = L * (2 * H * bottleneck + H + bottleneck) * 4 + (sizes["head"] * 4 if head_trains else 0)
    acts = B * T * _inference_elements(traits, d, T) * cb + _mask_bytes(traits, d, B, T, cb) + B * T * H * cb
    return MemoryEstimate(frozen_weights=int(frozen), trainable=int(trainable), gradients=0, optimizer_state=0,
                          activations=int(acts), cache=int(cache_bytes),
                          notes={"family": traits.family, "num_layers": L, "phase": "prefix fill", "batch_size": B,
                                 "seq_len": T, "dtype": dtype})


def streamed_chainfed_bytes(model_config_like, window: int, *, batch_size: int, seq_len: int, bottleneck: int = 64,
                            optimizer: Literal["sgd", "adamw"] = "sgd", dtype: str = "float32") -> MemoryEstimate:
    """Peak of a ChainFed client as deployed: layers streamed from a layer store, the window's
    input read from the frozen-prefix activation cache, which keeps one batch in memory and
    spills the rest of the client's examples to disk. The larger of the two phases: a window
    step (:func:`peak_training_bytes`, ``streamed`` and ``cached``) and the cache fill once per
    window position (:func:`prefix_fill_bytes`); ``notes["phase"]`` says which."""
    config = hf_config(model_config_like)
    one_batch = batch_size * seq_len * _dims(config)["H"] * _BYTES[dtype]
    step = peak_training_bytes(config, "chainfed", window, batch_size, seq_len, dtype=dtype, bottleneck=bottleneck,
                               optimizer=optimizer, streamed=True, cached=True, cache_bytes=one_batch)
    fill = prefix_fill_bytes(config, batch_size, seq_len, dtype=dtype, bottleneck=bottleneck, cache_bytes=one_batch)
    step.notes["phase"] = "window step"
    return step if step.total >= fill.total else fill
