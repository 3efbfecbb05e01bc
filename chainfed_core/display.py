"""What a reader of the workbook sees: quiet libraries, figures inline, tables that read.

Every notebook starts its first code cell after the parameters with :func:`setup_notebook`
(before transformers is imported) and shows its tables through :func:`styled`::

    from chainfed_core import display
    display.setup_notebook()
    ...
    display.styled(table, columns={"accuracy": "accuracy (%)"}, caption="Test accuracy, mean over seeds")

Numbers read to three significant digits (:func:`sig`), methods by the registry's labels
(:func:`method_label`), headers with their units. Only the view changes: the tables the
notebooks compute and the summaries they write stay as they are.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path

MISSING = "–"      # how a NaN cell reads

# Columns of a grid's run table (chainfed_core.experiments.summarise) as a reader sees them:
# column -> (header with its unit, factor applied to the value). Columns not listed keep their
# name; "curve", "run_id" and "method" (the variant names it) are left out.
RUN_COLUMNS = {
    "accuracy": ("test accuracy (%)", 100.0),
    "rounds": ("rounds", 1),
    "bytes_total": ("exchanged (MB)", 2.0 ** -20),
    "peak_memory_bytes": ("peak memory (MB)", 2.0 ** -20),
    "start_layer": ("start layer", 1),
    "window": ("window W", 1),
    "wall_s": ("wall time (s)", 1),
    "rounds_to_baseline": ("rounds to Full Adapters' accuracy", 1),
    "bytes_to_baseline": ("MB to Full Adapters' accuracy", 2.0 ** -20),
    "speedup": ("speed-up (×)", 1),
    "comm_reduction": ("communication reduction (×)", 1),
    "rounds_to_converge": ("rounds to converge", 1),
    "bytes_to_converge": ("MB to converge", 2.0 ** -20),
    "client_s_to_converge": ("client seconds to converge", 1),
    "eligible_clients": ("eligible devices", 1),
    "test_examples": ("test examples", 1),
}
HIDDEN_RUN_COLUMNS = ("curve", "costs", "run_id", "method")
SHARED_LABELS = ("model", "dataset", "partition", "seed")     # said once in the caption when all runs share one


def quiet_libraries() -> None:
    """Silence what says nothing to a reader, at its source.

    transformers: info and warning logs (the "LOAD REPORT" table of a freshly initialised
    classifier head) and its weight-loading bars; datasets: its Map / Filter / generate
    bars and logs; huggingface_hub: download bars; tqdm: the "IProgress not found" warning
    that ``tqdm.auto`` gives in a kernel without ipywidgets (its bars fall back to text on
    stderr, which the batch runner streams to the terminal). Errors still show.
    """
    from tqdm import TqdmWarning

    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def setup_notebook() -> None:
    """:func:`quiet_libraries`, and figures drawn inline in a Jupyter kernel even where the
    environment sets ``MPLBACKEND`` to a non-interactive backend (figures are still saved
    as PNG by the notebooks themselves)."""
    quiet_libraries()
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":
        shell.run_line_magic("matplotlib", "inline")


def sig(value, digits: int = 3) -> str:
    """A table cell to ``digits`` significant digits, never in exponent form.

    ``0.83754 -> '0.838'``, ``70.93 -> '70.9'``, ``1234.5 -> '1,230'``, ``0.5 -> '0.500'``;
    integers are shown whole (``12 -> '12'``), NaN and None as "–", anything else (text such
    as "not reported") as it is.
    """
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    x = float(value)
    if math.isnan(x):
        return MISSING
    if math.isinf(x) or x == 0:
        return f"{x:g}"
    x = float(f"{x:.{digits}g}")                      # round first: 0.9996 -> 1.0 has one digit before the point
    decimals = max(digits - 1 - math.floor(math.log10(abs(x))), 0)
    return f"{x:,.{decimals}f}"


def method_label(name: str) -> str:
    """How tables name a method: the registry's label (``"full_adapters" -> "Full Adapters"``);
    a name that is not a registered method (a variant such as ``"W=3"``) is returned as is."""
    from .methods import get_method, method_names

    return get_method(name).label if name in method_names() else name


def styled(df, columns: dict[str, str] | None = None, *, caption: str | None = None, hide_index: bool = False):
    """``df`` as a reader sees it: columns renamed by ``columns`` (old -> new, where the units
    go), every number to three significant digits (:func:`sig`), an optional caption.

    Returns a pandas ``Styler``: it renders as an HTML table in notebooks and reports and
    leaves ``df`` itself unchanged.
    """
    view = df.rename(columns=columns or {})
    style = view.style.format(sig).set_table_styles([{"selector": "td", "props": "white-space: nowrap"}])
    if caption:
        style = style.set_caption(caption)
    if hide_index:
        style = style.hide(axis="index")
    return style


def runs_table(df):
    """One row per run of a grid (:func:`chainfed_core.experiments.run_grid`), with units:
    accuracy in %, bytes in MB, seconds; the test curve, run hash and method key left out,
    and a label shared by every run (one model, one seed) said once, in the caption."""
    view = df.drop(columns=[c for c in HIDDEN_RUN_COLUMNS if c in df.columns])
    shared = [c for c in SHARED_LABELS if c in view.columns and len(view) > 1 and view[c].nunique(dropna=False) == 1]
    caption = ", ".join(f"{c} {view[c].iloc[0]}" for c in shared)
    view = view.drop(columns=shared)
    headers = {}
    for column, (header, factor) in RUN_COLUMNS.items():
        if column not in view.columns:
            continue
        if header in view.columns:           # the notebook made this column itself: keep that one
            view = view.drop(columns=column)
            continue
        if factor != 1:
            view[column] = view[column] * factor
        headers[column] = header
    return styled(view, headers, hide_index=True, caption=f"Every run: {caption}" if caption else None)


def saved(path: str | Path, what: str = "read back by the tests and the report"):
    """A one-line note that a summary JSON was written: its path and how many numbers it
    holds (the ``metrics`` of :func:`chainfed_core.experiments.write_summary`, or a flat dict)."""
    from IPython.display import Markdown

    path = Path(path)
    data = json.loads(path.read_text())
    numbers_held = data.get("metrics", data)
    count = sum(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in numbers_held.values())
    shown = path.resolve().relative_to(_repo_root()) if path.resolve().is_relative_to(_repo_root()) else path
    return Markdown(f"Summary written to `{shown}`: {count} numbers, {what}.")


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
