"""The README as a newcomer uses it: its federated example runs exactly as written, its make
targets exist, and it (with data/README.md and the notebooks) points only at files in the repo."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from chainfed_core.assets import ASSETS

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
OUTSIDE = re.compile(r"(\.\./|/work/)shared\b")     # the developers' folder beside the clone


def _section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def federated_command() -> list[str]:
    """The first bash block of the README's "Federated runtime" section, as argv."""
    block = re.search(r"```bash\n(.*?)```", _section(README, "Federated runtime"), re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_the_federated_example_is_one_command_with_an_out_folder():
    argv = federated_command()
    assert argv[:3] == [".venv/bin/python", "-m", "chainfed_core.federated"]
    assert argv[argv.index("--out") + 1] == "runs/demo"


@pytest.mark.slow
def test_the_federated_example_runs_as_written(tmp_path):
    """Exactly the README's command (only --out moved to a temporary folder), from the repo root."""
    argv = federated_command()
    argv[argv.index("--out") + 1] = str(tmp_path / "demo")
    argv[0] = str(REPO / argv[0]) if (REPO / argv[0]).exists() else sys.executable
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "demo"
    for name in ("record.json", "metrics.jsonl", "checkpoint.pkl"):
        assert (out / name).is_file() and name in README
    record = json.loads((out / "record.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    k = record["config"]["fed"]["clients_per_round"]
    assert len(rounds) == record["config"]["fed"]["rounds"]
    # Clients change from round to round: K is well below the eligible count, and the draws differ.
    assert record["eligible_clients"] >= 2 * k
    assert len({tuple(r["clients"]) for r in rounds}) > len(rounds) // 2
    assert len({c for r in rounds for c in r["clients"]}) > k
    # The test set is the README's size, and the last line says the final accuracy the record holds.
    max_test = int(next(a for a in argv if a.startswith("data.max_test_examples=")).split("=")[1])
    assert sum(record["data"]["counts"]["test"].values()) == max_test
    assert f"{record['final']['test_accuracy']:.3f}" in proc.stdout.strip().splitlines()[-1]
    assert f"`eligible_clients` ({record['eligible_clients']})" in README


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", README))
    assert named and named <= targets, named - targets


def _documents() -> dict[Path, str]:
    """Every text a user reads: the READMEs and the notebooks' markdown cells."""
    docs = {p: p.read_text() for p in [REPO / "README.md", REPO / "data" / "README.md", REPO / "flower_app" / "README.md"]}
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = nbformat.read(nb, as_version=4).cells
        docs[nb] = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    return docs


def test_documents_link_only_to_files_in_the_repository():
    for path, text in _documents().items():
        assert not OUTSIDE.search(text), f"{path.name} points outside the repository"
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (path.parent / target).resolve()
            assert resolved.is_relative_to(REPO) and resolved.exists(), f"{path.name}: broken link {target}"


def test_source_files_the_readme_names_exist():
    named = set(re.findall(r"`((?:chainfed_core|benchmarks|scripts|notebooks|flower_app|tests)/[\w./-]+"
                           r"\.(?:py|ipynb|md|sh))`", README))
    assert named
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, missing


def test_data_readme_lists_every_asset_with_its_pins():
    text = (REPO / "data" / "README.md").read_text()
    for asset in ASSETS.values():
        assert f"`{asset.name}`" in text
        for archive in asset.archives:
            assert archive.sha256 in text, (asset.name, archive.requirement)
            assert archive.requirement.split("==")[0].rsplit("-part", 1)[0] in text
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/README.md"], cwd=REPO).returncode == 0
    assert not ignored and subprocess.run(["git", "check-ignore", "-q", "data/cache/x"], cwd=REPO).returncode == 0
