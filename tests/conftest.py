"""Shared fixtures: the book built from clean once per test session."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEST_BUILD = ROOT / "_build" / "test-book"


def toc_files() -> list[str]:
    """Every document in _toc.yml, in reading order (e.g. 'book/intro')."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections", []))
            walk(entry.get("chapters", []))

    walk(toc.get("parts", []))
    return files


def chapter_notebooks() -> list[Path]:
    return [ROOT / f"{f}.ipynb" for f in toc_files() if (ROOT / f"{f}.ipynb").exists()]


def cell_limit() -> int:
    """The per-cell execution limit of the book build, in seconds (_config.yml)."""
    return int(yaml.safe_load((ROOT / "_config.yml").read_text())["execute"]["timeout"])


def longest_cells(cell_log: Path, notebooks: list[str]) -> dict[str, dict]:
    """Per executed notebook, its longest cell: ``{"seconds", "first_line"}``.

    The log has one line per cell with the kernel's pid; kernels ran one after another in the
    order the build executed the notebooks.
    """
    if not cell_log.exists():
        return {}
    by_kernel: dict[int, list[dict]] = {}
    for line in cell_log.read_text().splitlines():
        record = json.loads(line)
        by_kernel.setdefault(record["pid"], []).append(record)
    kernels = list(by_kernel.values())  # dicts keep insertion order: the order kernels first logged
    if len(kernels) != len(notebooks):
        return {}
    return {nb: max(cells, key=lambda c: c["seconds"]) for nb, cells in zip(notebooks, kernels)}


@pytest.fixture(scope="session")
def built_book():
    """Build the whole book from clean with every warning an error; return the HTML folder.

    From clean means a fresh output folder (no execution cache) and a fresh cache of trained
    networks, so every notebook really runs. Set QBOOK_HTML to test an existing build instead.
    """
    if os.environ.get("QBOOK_HTML"):
        return Path(os.environ["QBOOK_HTML"])
    subprocess.run(["rm", "-rf", str(TEST_BUILD)], check=True)
    TEST_BUILD.mkdir(parents=True)
    # the kernels' own IPython profile, whose startup file logs every cell's time
    startup = TEST_BUILD / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "cell_timer.py", startup / "00-cell-timer.py")
    cell_log = TEST_BUILD / "cell-times.jsonl"
    env = dict(os.environ, QLIB_CACHE_DIR=str(TEST_BUILD / "qlib-cache"), QLIB_PROGRESS="0",
               IPYTHONDIR=str(TEST_BUILD / "ipython"), QBOOK_CELL_TIMES=str(cell_log))
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "--path-output",
               str(TEST_BUILD), "--all", "-W", "-n", "--keep-going"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    log = result.stdout + result.stderr
    (TEST_BUILD / "build.log").write_text(log)
    times = {m.group(1): float(m.group(2))
             for m in re.finditer(r"(book/\S+?)\.ipynb: Executed notebook in ([\d.]+) seconds", log)}
    timings = {"build_seconds": elapsed, "notebooks": times, "cell_limit": cell_limit(),
               "longest_cells": longest_cells(cell_log, list(times))}
    (TEST_BUILD / "timings.json").write_text(json.dumps(timings, indent=2))
    if result.returncode != 0:
        warnings = "\n".join(line for line in log.splitlines() if "WARNING" in line or "ERROR" in line)
        pytest.fail(f"the book build failed (exit {result.returncode}); see {TEST_BUILD / 'build.log'}\n"
                    f"{warnings[-6000:] or log[-6000:]}")
    return TEST_BUILD / "_build" / "html"
