"""The README's result tables are what scripts/readme_tables.py builds from the committed summaries."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "scripts" / "readme_tables.py")
readme_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_tables)


@pytest.mark.parametrize("name", list(readme_tables.TABLES))
def test_the_readme_table_is_regenerated_from_the_committed_summary(name):
    text = (ROOT / "README.md").read_text()
    assert readme_tables.rewrite(text, name, readme_tables.TABLES[name]()) == text, (
        f"README.md's '{name}' differs from the committed summary: run python scripts/readme_tables.py --write")


def test_a_missing_block_is_named():
    with pytest.raises(SystemExit, match="no '<!-- BEGIN table1 cpu-full -->'"):
        readme_tables.rewrite("no tables here", "table1 cpu-full", "x")
