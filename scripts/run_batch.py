"""Run the workbook's notebooks through papermill and render them as HTML reports.

    python scripts/run_batch.py --profile cpu-full        # every result notebook of a profile (make report)
    python scripts/run_batch.py --quickstart              # 00_quickstart at the README's size (make quickstart)
    python scripts/run_batch.py --quickstart full         # the same, into the committed artefacts (make reproduce-quickstart)

While a notebook runs, the terminal shows which notebook and which cell is running and
streams what the kernel prints, training progress bars included. The saved notebook and its
HTML keep every cell's results (tables, figures, printed lines) but not its stderr (progress
bars, warnings), so a report reads clean.

A profile batch writes ``reports/<profile>/<notebook>.ipynb`` and ``.html`` and an index,
``reports/report_<profile>.html``: what each artefact reproduces, its figure, and links to its
notebook, summary and figure. Runs already recorded under ``results/runs/<profile>/`` are
reused, so a batch interrupted and started again continues where it stopped. A failing
notebook does not stop the batch; the exit status is non-zero if any failed.

The quickstart writes ``reports/00_quickstart.ipynb`` and ``.html``; with tag ``local`` (the
default) its records go to ``results/quickstart/local/`` and its PNGs to ``figures/quick/``
(both git-ignored), with tag ``full`` to the committed ``results/quickstart/full/`` and ``figures/``.
"""

from __future__ import annotations

import argparse
import base64
import html
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from chainfed_core import paper  # noqa: E402
from chainfed_core.experiments import profile as profile_settings  # noqa: E402
from chainfed_core.records import code_version  # noqa: E402  (read now, before a notebook writes anything)

REPORTS = REPO / "reports"
NOTEBOOKS = ["table1_main_results", "table2_threshold", "table3_instruction_tuning", "table4_ablation",
             "fig10_llm_sensitivity", "appF2_generalization", "fig11_case_study",
             "fig8_window_size", "fig9_global_weight", "obs1_memory_constrained", "beyond_dp_tradeoff"]
CLAIMS = "claims"        # the claims page: executed after NOTEBOOKS, first in the index
PROFILES = ["quick", "cpu", "cpu-full", "gpu-full"]
# The README's quickstart: MiniLM-L6 on sarcasm, 1,000 training and 500 test examples, 6 rounds.
QUICKSTART = {"max_train": 1000, "max_test": 500, "rounds": 6}
QUICKSTART_TAGS = ["local", "full"]
# The kernel's own log (its "running over TCP without encryption" notice) says nothing to a reader.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


# A cell that prints nothing for this long (a slow round, a long evaluation) gets a line that says it still runs.
HEARTBEAT_S = 30


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class CellProgress:
    """What the terminal is told while a notebook runs.

    nbclient calls :meth:`start` and :meth:`finish` around each code cell: one line names the
    notebook, the time since it started, the cell and its first line of code. The kernel's own
    output passes through :meth:`stream` as it comes (progress bars included); if a cell stays
    silent for ``HEARTBEAT_S`` seconds, a line says it is still running.
    """

    def __init__(self, name: str, code_cells: int, heartbeat_s: float = HEARTBEAT_S):
        self.name, self.code_cells, self.done, self.heartbeat_s = name, code_cells, 0, heartbeat_s
        self.started = self.cell_started = self.last_output = time.perf_counter()
        self.running = False
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)

    def __enter__(self) -> "CellProgress":
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()

    def _line(self, text: str) -> None:
        _say(f"[{self.name} {_clock(time.perf_counter() - self.started)}] {text}")
        self.last_output = time.perf_counter()

    def start(self, cell, cell_index: int, **_) -> None:
        self.done += 1
        self.cell_started, self.running = time.perf_counter(), True
        lines = [s for s in cell.source.splitlines() if s.strip() and not s.lstrip().startswith("#")]
        first = (lines[0].strip() if lines else cell.source.strip().splitlines()[0])[:70]
        self._line(f"cell {self.done}/{self.code_cells}: {first}")

    def finish(self, cell, cell_index: int, **_) -> None:
        self.running = False
        seconds = time.perf_counter() - self.cell_started
        if seconds >= 10:
            self._line(f"cell {self.done}/{self.code_cells} took {_clock(seconds)}")

    def stream(self, terminal):
        """A file-like object for papermill's ``stdout_file``/``stderr_file``: writes go to
        ``terminal`` at once and count as output."""
        progress = self

        class Echo:
            def write(self, text: str) -> None:
                terminal.write(text)
                terminal.flush()
                progress.last_output = time.perf_counter()

            def flush(self) -> None:
                terminal.flush()

        return Echo()

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(1.0, self.heartbeat_s / 3)):
            now = time.perf_counter()
            if self.running and now - self.last_output >= self.heartbeat_s:
                print(file=sys.stderr)      # off any progress bar's line
                self._line(f"cell {self.done}/{self.code_cells} still running ({_clock(now - self.cell_started)})")


def without_stderr(nb):
    """``nb`` with every stderr stream output removed (progress bars, warnings); results,
    printed lines and error tracebacks stay."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.get("name") == "stderr")]
    return nb


def execute(source: Path, target: Path, parameters: dict) -> dict:
    """Run the notebook ``source`` with ``parameters`` into ``target`` (then its HTML beside it).

    The kernel's stdout and stderr stream to this terminal as they come; the saved notebook
    keeps no stderr. Returns the notebook's name, wall time and error (None when it ran).
    """
    import nbformat
    import papermill

    name = source.stem
    code_cells = sum(c.cell_type == "code" for c in nbformat.read(source, as_version=4).cells) + bool(parameters)
    target.parent.mkdir(parents=True, exist_ok=True)
    error = None
    with CellProgress(name, code_cells) as progress:
        try:
            papermill.execute_notebook(source, target, parameters=parameters, cwd=str(REPO / "notebooks"),
                                       progress_bar=False, extra_arguments=KERNEL_ARGUMENTS,
                                       stdout_file=progress.stream(sys.stdout), stderr_file=progress.stream(sys.stderr),
                                       on_cell_execute=progress.start, on_cell_executed=progress.finish)
        except Exception as err:     # keep going: the report shows which artefact failed and why
            lines = str(err).strip().splitlines()
            error = f"{type(err).__name__}: {lines[-1] if lines else ''}"
    seconds = time.perf_counter() - progress.started
    if target.exists():
        nbformat.write(without_stderr(nbformat.read(target, as_version=4)), target)
        to_html(target)
    shown = target.relative_to(REPO) if target.is_relative_to(REPO) else target
    _say(f"[{name}] {'done' if error is None else 'FAILED: ' + error} in {_clock(seconds)}: {shown}")
    return {"name": name, "seconds": seconds, "error": error}


def to_html(notebook: Path) -> Path:
    """nbconvert an executed notebook to HTML beside it (figures embedded)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    target = notebook.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return target


# ---------------------------------------------------------------------- the index page
def describe(notebook: Path) -> tuple[str, str]:
    """A notebook's title (its first heading) and its opening paragraph, as HTML."""
    import mistune
    import nbformat

    text = next(c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "markdown")
    heading, _, rest = text.partition("\n")
    opening = rest.strip().split("\n\n")[0]
    return heading.lstrip("# ").strip(), mistune.html(opening)


def _link(path: Path, label: str, base: Path) -> str:
    return f"<a href='{html.escape(os.path.relpath(path, base))}'>{html.escape(label)}</a>"


def section(result: dict, profile: str, out_dir: Path, base: Path) -> str:
    """One artefact's part of the index: what it reproduces, its status, figure and links."""
    name = result["name"]
    title, opening = describe(REPO / "notebooks" / f"{name}.ipynb")
    if result["error"] is None:
        status = f"ran in {_clock(result['seconds'])}"
    else:
        status = f"<strong>failed</strong> after {_clock(result['seconds'])}: {html.escape(result['error'])}"
    page, executed = out_dir / f"{name}.html", out_dir / f"{name}.ipynb"
    figure = REPO / "figures" / ("quick" if profile == "quick" else "") / f"{name}_{profile}.png"
    summary = REPO / "results" / name / profile / "summary.json"
    links = [_link(p, label, base) for p, label in [(page, "notebook with every table"), (executed, "executed .ipynb"),
                                               (summary, "summary JSON"), (figure, "figure PNG")] if p.exists()]
    parts = [f"<h2>{html.escape(title)}</h2>", opening, f"<p>{status} &middot; {' &middot; '.join(links)}</p>"]
    if name == CLAIMS and result["error"] is None:             # the claims table itself opens the report
        from chainfed_core import claims

        parts.append(claims.claims_frame(profile, REPO).to_html(index=False, border=0, classes="claims"))
    if figure.exists() and result["error"] is None:
        data = base64.b64encode(figure.read_bytes()).decode()
        parts.append(f"<img src='data:image/png;base64,{data}' alt='{html.escape(title)}' style='max-width:100%'>")
    return "\n".join(parts)


def write_index(results: list[dict], profile: str, out_dir: Path, index: Path | None = None) -> Path:
    """The report's front page, ``reports/report_<profile>.html`` unless ``index`` is given."""
    failed = [r["name"] for r in results if r["error"]]
    outcome = (f"All {len(results)} notebooks ran." if not failed
               else f"{len(failed)} of {len(results)} notebooks failed: {', '.join(failed)}.")
    index = index or REPORTS / f"report_{profile}.html"
    body = "\n".join(section(r, profile, out_dir, index.parent) for r in results)
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>ChainFed workbook: profile {profile}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto;line-height:1.4}} h2{{margin-top:2em}}
table.claims{{border-collapse:collapse;font-size:90%}} table.claims td,table.claims th{{padding:3px 6px;border-bottom:1px solid #ddd;text-align:left}}</style></head><body>
<h1>ChainFed workbook, profile <code>{profile}</code></h1>
<p>This report reruns the workbook's result notebooks: one per table or figure of the paper
(Wu et al., <i>Beyond End-to-End: Dynamic Chain Optimization for Private LLM Adaptation on the Edge</i>,
arXiv 2604.06819), each comparing ChainFed with the baselines and ablations the paper reports.
Profile <code>{profile}</code>: {html.escape(profile_settings(profile)['help'])}</p>
<p>{outcome} Each section says what its notebook reproduces and shows its figure; the linked notebook holds
every table, our numbers beside the paper's. {html.escape(paper.LEGEND)}</p>
<p><small>Code version {html.escape(str(code_version()))}; written {time.strftime('%Y-%m-%d %H:%M')}.</small></p>
{body}
</body></html>"""
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(page, encoding="utf-8")
    return index


# ---------------------------------------------------------------------- entry points
def run_profile(profile: str, names: list[str]) -> int:
    out_dir = REPORTS / profile
    results = []
    names = [n for n in names if n != CLAIMS] + [CLAIMS]   # the claims read what the others wrote: run last
    for i, name in enumerate(names, 1):
        _say(f"== {name} ({i} of {len(names)}, profile {profile}) ==")
        results.append(execute(REPO / "notebooks" / f"{name}.ipynb", out_dir / f"{name}.ipynb", {"profile": profile}))
    index = write_index([results[-1], *results[:-1]], profile, out_dir)   # ... and shown first
    _say(f"report: {index.relative_to(REPO)}")
    return 1 if any(r["error"] for r in results) else 0


def run_quickstart(tag: str) -> int:
    result = execute(REPO / "notebooks" / "00_quickstart.ipynb", REPORTS / "00_quickstart.ipynb", {**QUICKSTART, "tag": tag})
    where = "results/quickstart/full/ and figures/" if tag == "full" else "results/quickstart/local/ and figures/quick/"
    _say(f"report: reports/00_quickstart.html (records in {where})")
    return 1 if result["error"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick", help="profile of the result notebooks")
    parser.add_argument("--notebooks", nargs="*", default=NOTEBOOKS, help="subset of the result notebooks")
    parser.add_argument("--quickstart", nargs="?", const="local", choices=QUICKSTART_TAGS,
                        help="run 00_quickstart instead: 'local' (git-ignored outputs) or 'full' (the committed ones)")
    args = parser.parse_args(argv)

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.pop("MPLBACKEND", None)    # kernels draw figures inline (chainfed_core.display.setup_notebook)
    if args.quickstart:
        return run_quickstart(args.quickstart)
    return run_profile(args.profile, args.notebooks)


if __name__ == "__main__":
    sys.exit(main())
