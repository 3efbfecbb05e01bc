"""Run every result notebook of a profile through papermill, then render one HTML report.

    python scripts/run_batch.py --profile cpu-full

Executed notebooks and their HTML go to ``reports/<profile>/``; ``reports/report_<profile>.html``
gathers, per artefact, its status and run time, its figure, the numbers of its summary JSON
and a link to the full notebook (where every table stands beside the paper's number).
Runs already recorded under ``results/runs/<profile>/`` are reused, so a batch interrupted
and started again continues where it stopped. A failing notebook does not stop the batch;
the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["table1_main_results", "table2_threshold", "table4_ablation", "fig8_window_size", "fig9_global_weight"]
PROFILES = ["quick", "cpu-full", "gpu-full"]


def execute(name: str, profile: str, out_dir: Path) -> dict:
    """Run one notebook with ``profile``; return its status and wall time."""
    import papermill

    started = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(REPO / "notebooks" / f"{name}.ipynb", out_dir / f"{name}.ipynb",
                                   parameters={"profile": profile}, cwd=str(REPO / "notebooks"), progress_bar=True)
    except Exception as err:     # keep going: the report shows which artefact failed and why
        error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    return {"name": name, "seconds": time.perf_counter() - started, "error": error}


def to_html(notebook: Path) -> Path | None:
    """nbconvert an executed notebook to HTML beside it."""
    if not notebook.exists():
        return None
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    target = notebook.with_suffix(".html")
    target.write_text(body)
    return target


def section(result: dict, profile: str, out_dir: Path) -> str:
    """One artefact's part of the index page."""
    name = result["name"]
    status = "ok" if result["error"] is None else f"FAILED: {html.escape(result['error'])}"
    parts = [f"<h2>{name}</h2>", f"<p>{status} &middot; {result['seconds'] / 60:.1f} min"]
    page = out_dir / f"{name}.html"
    if page.exists():
        parts.append(f" &middot; <a href='{page.relative_to(REPO / 'reports')}'>full notebook</a>")
    parts.append("</p>")
    figure = REPO / "figures" / ("quick" if profile == "quick" else "") / f"{name}_{profile}.png"
    if figure.exists() and result["error"] is None:
        data = base64.b64encode(figure.read_bytes()).decode()
        parts.append(f"<img src='data:image/png;base64,{data}' style='max-width:100%'>")
    summary = REPO / "results" / name / profile / "summary.json"
    if summary.exists() and result["error"] is None:
        metrics = json.loads(summary.read_text())["metrics"]
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in metrics.items())
        parts.append(f"<details><summary>summary.json ({len(metrics)} numbers)</summary>"
                     f"<table>{rows}</table></details>")
    return "\n".join(parts)


def write_index(results: list[dict], profile: str, out_dir: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from chainfed_core import paper
    from chainfed_core.records import code_version

    headline = "".join(f"<li>{html.escape(k)}: {v.value} {html.escape(v.unit)} <small>({html.escape(v.source)})</small></li>"
                       for k, v in paper.HEADLINE.items())
    body = "\n".join(section(r, profile, out_dir) for r in results)
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>ChainFed report: {profile}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} td{{padding:0 1em}}</style></head><body>
<h1>ChainFed workbook report, profile <code>{profile}</code></h1>
<p>Code version {code_version()}; generated {time.strftime('%Y-%m-%d %H:%M')}. Each notebook shows our numbers
beside the paper's (<code>chainfed_core/paper.py</code>); {len(paper.not_found())} paper values were not found in the
stored copy of the paper and are shown as "not found".</p>
<h3>The paper's headline numbers</h3><ul>{headline}</ul>
{body}
</body></html>"""
    index = REPO / "reports" / f"report_{profile}.html"
    index.write_text(page)
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--notebooks", nargs="*", default=NOTEBOOKS, help="subset of notebook names")
    args = parser.parse_args(argv)

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("MPLBACKEND", "Agg")
    out_dir = REPO / "reports" / args.profile
    out_dir.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(args.notebooks, desc=f"batch {args.profile}", unit="notebook")
    for name in bar:
        bar.set_postfix_str(name)
        result = execute(name, args.profile, out_dir)
        to_html(out_dir / f"{name}.ipynb")
        results.append(result)
        bar.write(f"{name}: {'ok' if result['error'] is None else result['error']} ({result['seconds']:.0f} s)")
    index = write_index(results, args.profile, out_dir)
    print(f"report: {index.relative_to(REPO)}")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
