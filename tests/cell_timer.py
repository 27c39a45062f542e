"""IPython startup file for the book build: append each cell's wall time to ``$QBOOK_CELL_TIMES``.

``tests/conftest.py`` copies it into a fresh IPython profile of the build's kernels, so that the
build reports its longest cells against the per-cell limit (``execute.timeout`` in _config.yml).
Each kernel is one notebook; its lines carry the kernel's process id, in execution order.
"""

import json
import os
import time

_log = os.environ.get("QBOOK_CELL_TIMES")
_shell = get_ipython()  # noqa: F821 - defined in IPython startup files
if _log and _shell is not None:
    _started = {}

    def _before(info):
        _started["t"], _started["source"] = time.perf_counter(), info.raw_cell

    def _after(result):
        if "t" not in _started:
            return
        lines = [line for line in _started["source"].splitlines() if line.strip()]
        record = {"pid": os.getpid(), "seconds": round(time.perf_counter() - _started.pop("t"), 2),
                  "first_line": lines[0][:70] if lines else ""}
        with open(_log, "a") as f:
            f.write(json.dumps(record) + "\n")

    _shell.events.register("pre_run_cell", _before)
    _shell.events.register("post_run_cell", _after)
