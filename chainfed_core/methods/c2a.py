"""C2A (Kim et al., ACL Findings 2023): client-customised adapters from one shared hypernetwork.

The backbone stays frozen. A hypernetwork, shared by every client and layer, generates each
layer's bottleneck adapter from a conditioning token; only the hypernetwork and the head train
and travel, and the server averages them by FedAvg weighted by the clients' example counts
(the default :meth:`Method.aggregate`). For layer l and a batch of hidden states h (B, T, H):

    p    = the batch's label histogram (training) or uniform (evaluation)          (K,)
    ctx  = mean over the batch of normalize(mean over tokens of h)                 (H,)
    e    = Linear(K -> d)(p) + Embedding(L, d)(l) + Linear(H -> d)(ctx)            (d,)   d = task_dim
    W    = rownormalize(reshape(H_low @ H_high + b_high, (d, H r)))                (d, H r)
    θ    = e · W                                                                   (H r,)
    out  = h + GELU(h · θ.view(H, r) + b1_l) · θ.view(r, H) + b2_l

H_low is (d r, c) with c = con_dim, H_high a Linear(c -> H); the two adapter weights are two
views of the same θ (tied, reshaped, not transposed), as in the authors' code. Two clients
whose batches hold different labels thus get different adapters from the same weights
(:func:`label_histogram`, :func:`generate`).

Where it sits, and other readings of the original (distilbert-base-multilingual-cased with
two adapters a layer, after the attention block and after the FFN, before residual and
LayerNorm):

- one generated adapter per layer, where this project's adapter sits (after the layer's
  output, ``chainfed_core.adapter``), hooked the same way; the token's layer id is the layer's
  index, so the Embedding has L rows (the original: L rows per adapter position);
- the adapter biases b1 (r) and b2 (H) are per-layer parameters of the hypernetwork, zero at
  start, and H_high carries a bias of H; the notes only say "+ bias" (this keeps the
  hypernetwork at the original's "about 40k parameters": 40,432 at H = 768, r = 16, L = 6, ten classes);
- ctx averages every token, padding included (the hook sees hidden states, not the mask) and
  keeps its gradient, so a layer's adapter also trains through the earlier layers' context;
- a causal LM (LLaMA) has no labels: its token drops the label term, and its head (the
  frozen LM head) does not train, so only the hypernetwork travels;
- float32 throughout (the original trains with fp16 autocast on CUDA).

Hyper-parameters. ``con_dim`` 32 and ``task_dim`` 8 are the original's (:class:`C2AOptions`);
the adapter rank r is ``adapter.bottleneck`` (the one home of an adapter's size, which
memory-aware selection reads), 16 in the variant "C2A". The variant also sets the original's
optimizer, AdamW; its learning rate is scaled from the original 3e-4 (batch 64, about 16 local
steps a round for 20 rounds, i.e. 320 steps) to 2e-3 since our profiles give a client about
four steps of batch 8 a round for twelve rounds: AdamW's step is about lr whatever the
gradient's scale, so lr x steps stays about the same. Batch size, rounds, clients and the
Dirichlet β come from the profile like every method's (the original: 64, 20 rounds, 25 of
100 clients, β = 0.5). Evaluation uses a uniform p, as the original; the per-client label
histogram the original computes but never uses is not computed.

Memory (:meth:`C2A.peak_bytes`, within 5% of the meter on tiny models): the whole backbone,
the hypernetwork and the head, their gradients and optimizer state, and the activations of
end-to-end adapter tuning plus each layer's weight generation; a device that cannot hold the
whole model cannot take part. That is 1-4% more than Full Adapters at the same r (MiniLM,
MPNet, LLaMA-7B; more on tiny models), so with the default ``fed.memory_scale`` (the largest
device just holds Full Adapters) no device holds C2A: runs set ``fed.memory_scale``, as the
experiment profiles do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Config, option
from .base import Method, register

if TYPE_CHECKING:
    import torch

    from ..backbone import Backbone

MODULE = "c2a"          # the hypernetwork's key: exchanged as ``modules.c2a.<param>``


@dataclass
class C2AOptions(Config):
    con_dim: int = option("c: inner width of the factorised generator H_low (d r x c) @ H_high (c x H) "
                          "(original 32).", 32, ge=1)
    task_dim: int = option("d: size of the conditioning token and rows of the generated W (original 8).", 8, ge=1)


# ---------------------------------------------------------------------- the method's parts
def label_histogram(labels: "torch.Tensor", num_labels: int) -> "torch.Tensor":
    """p: the share of each class among ``labels`` (B,): (K,) float32."""
    import torch

    counts = torch.bincount(labels, minlength=num_labels).to(torch.float32)
    return counts / counts.sum()


def context_summary(hidden: "torch.Tensor") -> "torch.Tensor":
    """ctx: the batch mean of the L2-normalised token averages of ``hidden`` (B, T, H): (H,)."""
    import torch.nn.functional as F

    return F.normalize(hidden.mean(dim=1), dim=-1).mean(dim=0)


def hypernetwork_size(hidden: int, num_layers: int, num_labels: int, rank: int, con_dim: int = 32,
                      task_dim: int = 8) -> int:
    """Parameters of :func:`build_hypernetwork` (no label term when ``num_labels`` is 0)."""
    label = (num_labels + 1) * task_dim if num_labels else 0
    token = label + num_layers * task_dim + (hidden + 1) * task_dim
    generator = task_dim * rank * con_dim + (con_dim + 1) * hidden
    return token + generator + num_layers * (rank + hidden)


def build_hypernetwork(hidden: int, num_layers: int, num_labels: int, rank: int, con_dim: int, task_dim: int):
    """The shared hypernetwork, standard layers by name (exchanged as ``modules.c2a.<name>.<param>``):

    label, layer, context   the token's three terms (``label`` absent when ``num_labels`` is 0)
    low.weight              H_low (d r, c)
    high                    H_high (c -> H) and its bias
    up_bias, down_bias      b1 (r) and b2 (H) of every layer, zero at start

    ``label_distribution`` holds p of the batch being trained on (None: uniform, evaluation)."""
    from torch import nn

    parts = {"label": nn.Linear(num_labels, task_dim)} if num_labels else {}
    parts.update(layer=nn.Embedding(num_layers, task_dim), context=nn.Linear(hidden, task_dim),
                 low=nn.Linear(con_dim, task_dim * rank, bias=False), high=nn.Linear(con_dim, hidden),
                 up_bias=nn.Embedding(num_layers, rank), down_bias=nn.Embedding(num_layers, hidden))
    hyper = nn.ModuleDict(parts)
    nn.init.zeros_(hyper["up_bias"].weight)
    nn.init.zeros_(hyper["down_bias"].weight)
    hyper.label_distribution = None
    return hyper


def token(hyper, layer: int, ctx: "torch.Tensor") -> "torch.Tensor":
    """e = Linear(p) + Embedding(layer) + Linear(ctx): (d,)."""
    import torch

    e = hyper["layer"].weight[layer] + hyper["context"](ctx)
    if "label" in hyper:
        num_labels = hyper["label"].in_features
        p = hyper.label_distribution
        if p is None:
            p = torch.full((num_labels,), 1.0 / num_labels, device=ctx.device)
        e = e + hyper["label"](p.to(ctx.device))
    return e


def generator_weights(hyper) -> "torch.Tensor":
    """W: reshape(H_low @ H_high + b_high) into d rows of H r, each L2-normalised: (d, H r)."""
    import torch.nn.functional as F

    w = hyper["high"](hyper["low"].weight)                                 # (d r, H)
    return F.normalize(w.reshape(hyper["layer"].embedding_dim, -1), dim=1)  # (d, H r)


def generate(hyper, layer: int, ctx: "torch.Tensor") -> "torch.Tensor":
    """θ = e · W, the flat adapter weights of ``layer`` in context ``ctx``: (H r,)."""
    return token(hyper, layer, ctx) @ generator_weights(hyper)


def adapt(hyper, layer: int, h: "torch.Tensor") -> "torch.Tensor":
    """h + GELU(h W_up + b1) W_down + b2 with W_up, W_down two views of θ: (B, T, H) -> (B, T, H)."""
    import torch.nn.functional as F

    x = h.to(hyper["low"].weight.dtype)
    hidden, rank = hyper["context"].in_features, hyper["up_bias"].embedding_dim
    theta = generate(hyper, layer, context_summary(x))
    w_up, w_down = theta.view(hidden, rank), theta.view(rank, hidden)          # tied views, not transposed
    delta = F.gelu(x @ w_up + hyper["up_bias"].weight[layer]) @ w_down + hyper["down_bias"].weight[layer]
    return h + delta.to(h.dtype)


def hypernetwork(backbone: "Backbone"):
    """The hypernetwork :meth:`C2A.prepare` gave ``backbone``."""
    return backbone.method_modules[MODULE]


def _adapt_output(hyper, layer: int, output):
    """Layers return a tensor or a tuple whose first item is the hidden states."""
    if isinstance(output, tuple):
        return (adapt(hyper, layer, output[0]),) + tuple(output[1:])
    return adapt(hyper, layer, output)


# ---------------------------------------------------------------------- the method
@register
class C2A(Method):
    name, label, Options = "c2a", "C2A", C2AOptions
    adapters, trains = False, "adapters"      # the plan trains every layer's (generated) adapter
    memory_shape = "full_adapters"
    variants = {"C2A": {"adapter": {"bottleneck": 16}, "train": {"optimizer": "adamw", "lr": 2e-3}}}

    def prepare(self, backbone: "Backbone") -> None:
        """Add the hypernetwork (seeded) and hook its adapter after every layer."""
        import torch

        torch.manual_seed(self.config.seed)
        num_labels = 0 if backbone.is_causal_lm else int(backbone.config.num_labels)
        hyper = build_hypernetwork(backbone.hidden_size, backbone.num_layers, num_labels,
                                   self.config.adapter.bottleneck, self.options.con_dim, self.options.task_dim)
        backbone.add_method_module(MODULE, hyper)
        for i, layer in enumerate(backbone.layers):
            layer.register_forward_hook(lambda _m, _args, out, i=i: _adapt_output(hyper, i, out))

    def client_update(self, backbone, dataset, plan, *, seed, pad_id=0):
        """The shared backprop loop, each batch's adapters generated with its label histogram."""
        from ..train import frozen_prefix, train_local

        hyper, frozen = hypernetwork(backbone), frozen_prefix(backbone, plan)

        def prefix(batch):
            if "label" in hyper:
                hyper.label_distribution = label_histogram(batch["labels"], hyper["label"].in_features)
            return frozen(batch)

        try:
            return train_local(backbone, dataset, plan, self.config.train, seed=seed, prefix=prefix, pad_id=pad_id)
        finally:
            hyper.label_distribution = None          # evaluation: uniform

    @classmethod
    def peak_bytes(cls, hf_config, window, *, batch_size, seq_len, bottleneck, optimizer, dtype):
        """End-to-end adapter tuning of the whole model (``full_adapters``' step), with the
        hypernetwork (of the default ``con_dim``, ``task_dim``) in place of the adapters' weights,
        and per layer: one more r per token (the GELU's input and output are both saved), and
        the generation's saved tensors, W before and after normalisation (2 d H r), θ (H r) and
        the context's normalised token averages with their norms (2 B H)."""
        from ..memory_model import MemoryEstimate, peak_training_bytes
        from ..model_parts import hf_config as to_hf_config

        config = to_hf_config(hf_config)
        base = peak_training_bytes(config, "full_adapters", 1, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                                   bottleneck=bottleneck, optimizer=optimizer)
        defaults = C2AOptions()
        L, r, d = base.notes["num_layers"], bottleneck, defaults.task_dim
        H = int(getattr(config, "hidden_size", None) or config.dim)
        num_labels = 0 if base.notes["family"] == "llama" else int(config.num_labels)
        adapters = L * (2 * H * r + H + r) * 4                                   # full_adapters' own, replaced
        hyper = hypernetwork_size(H, L, num_labels, r, defaults.con_dim, d) * 4
        gradients = base.gradients - adapters + hyper
        generation = L * (batch_size * seq_len * r * 4 + (2 * d * H * r + H * r + 2 * batch_size * H) * 4)
        return MemoryEstimate(frozen_weights=base.frozen_weights, trainable=base.trainable - adapters + hyper,
                              gradients=gradients, optimizer_state=gradients * (2 if optimizer == "adamw" else 1),
                              activations=base.activations + generation, notes={**base.notes, "method": cls.name})
