"""The chapters as stored: no outputs, one parameters cell, qlib imported, the chapter outline."""

import json

import pytest

from conftest import ROOT, chapter_notebooks, toc_files

NOTEBOOKS = chapter_notebooks()


def test_toc_entries_exist():
    for f in toc_files():
        assert (ROOT / f"{f}.ipynb").exists() or (ROOT / f"{f}.md").exists(), f"{f} in _toc.yml has no file"
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} has stored outputs; strip them"
            assert cell.get("execution_count") is None, f"{path.name} has execution counts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_outline(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    markdown = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters' holds the chapter's knobs"
    assert "SCALE" in "".join(tagged[0]["source"])
    assert any("from qlib" in "".join(c["source"]) or "import qlib" in "".join(c["source"]) for c in code)
    assert "**What you will learn**" in markdown and "**Builds on**" in markdown
    assert "{exercise}" in markdown and "{solution}" in markdown and ":class: dropdown" in markdown
    assert "{cite}" in markdown
    assert "## Summary" in markdown
