"""The chapters as stored: no outputs, one parameters cell, qlib imported, the chapter outline."""

import json
import re

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


#: The widest code line the book's page shows without clipping (its content column, in Chromium at
#: 1280 px, cuts code cells after 77 characters); the project's hard limit is 88.
PAGE_COLUMNS = 76


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_fits_the_page(path):
    nb = json.loads(path.read_text())
    wide = [(i, line) for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
            for line in "".join(cell["source"]).splitlines() if len(line) > PAGE_COLUMNS]
    assert not wide, f"{path.name}: {len(wide)} code lines wider than {PAGE_COLUMNS} columns, first in cell " \
                     f"{wide[0][0]}: {wide[0][1]!r}"


def _glue_keys_missing(nb: dict) -> list[str]:
    """Glue keys the prose uses that no ``publish(...)`` call of the notebook's code names."""
    md = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    used = set(re.findall(r"\{glue(?::text|:md)?\}`([A-Za-z0-9_]+)", md))
    used |= set(re.findall(r"\{glue:figure\}\s+([A-Za-z0-9_]+)", md))
    literal = set(re.findall(r'publish\(\s*"([A-Za-z0-9_]+)"', code))
    # publish(f"name_{x}") covers every key that fills its braces
    patterns = [re.compile("^" + re.sub(r"\\\{[^}]*\\\}", ".+", re.escape(f)) + "$")
                for f in re.findall(r'publish\(\s*f"([^"]+)"', code)]
    return sorted(k for k in used if k not in literal and not any(p.match(k) for p in patterns))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_glued_key_is_published(path):
    # a missing key fails the -W book build only after every chapter has run; this fails at once
    assert _glue_keys_missing(json.loads(path.read_text())) == []


def test_the_glue_check_finds_a_missing_key():
    nb = {"cells": [{"cell_type": "markdown", "source": ["{glue:text}`a` and {glue:text}`b_2:.1f`"]},
                    {"cell_type": "code", "source": ['publish("a", 1)\n', 'publish(f"b_{i}", 2)']}]}
    assert _glue_keys_missing(nb) == []
    nb["cells"][0]["source"].append(" {glue:figure} fig_c")
    assert _glue_keys_missing(nb) == ["fig_c"]
