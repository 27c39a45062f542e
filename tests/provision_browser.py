"""Find, or install, the Chromium that the browser check drives; record it for the tests.

``make test`` runs this as part of its setup (never as a separate step a user must know about).
It tries, in order, and stops at the first Chromium that starts (``--version`` answers):

1. ``$QBOOK_CHROMIUM``, if set (a browser of your choice);
2. a Chromium already there: Debian's ``/usr/bin/chromium``, ``chromium``, ``chromium-browser``,
   ``google-chrome`` or ``google-chrome-stable`` on ``PATH``, or one that Playwright installed
   (``~/.cache/ms-playwright``);
3. where the user is root and ``apt-get`` exists (a container, CI): ``apt-get install chromium``;
4. Playwright's own installer, ``python -m playwright install chromium`` (works where its
   download host is reachable).

The outcome goes to ``<venv>/browser.json``: ``{"executable": path or null, "tried": [...],
"fix": command}``. The browser tests read it (:func:`recorded_browser`); only when every step
failed do they fail, with one message that lists what was tried and the one command that would
fix it. This script itself always exits 0, so that the rest of ``make test`` still runs.

Every outside effect (``PATH``, the system locations, root, the installers) is a parameter of
:func:`provision`, so that ``tests/test_provision.py`` can run it on a machine with no Chromium
visible.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

SYSTEM_PATHS = ("/usr/bin/chromium",)
PATH_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
APT_INSTALL = (("apt-get", "update", "-q"),
               ("apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"))
STATE_FILE = Path(sys.prefix) / "browser.json"
VERSION_TIMEOUT = 30       # seconds for `chromium --version`
INSTALL_TIMEOUT = 900      # seconds for an installer (apt-get downloads ~100 MB)


@dataclass
class BrowserState:
    """What the provisioning found: the executable (or None), each step tried, the fix if none worked."""

    executable: str | None
    tried: list[str] = field(default_factory=list)
    fix: str | None = None

    def failure_message(self) -> str:
        steps = "\n".join(f"  - {t}" for t in self.tried) or "  (nothing)"
        return (f"no Chromium for the browser check. Tried:\n{steps}\n"
                f"Fix: {self.fix}\nthen run `make test` again.")


def _run(command: Sequence[str], timeout: float, env: dict | None = None) -> tuple[bool, str]:
    """Run ``command``; ``(succeeded, last line of its output or the reason it could not run)``."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        return False, "not found"
    except subprocess.TimeoutExpired:
        return False, f"no answer within {timeout:.0f} s"
    except OSError as error:
        return False, str(error)
    if done.returncode == 0:  # what it printed (a version), not a launcher script's warnings on stderr
        out = done.stdout.strip().splitlines()
        return True, out[0] if out else "ok"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return False, f"exit {done.returncode}: {lines[-1] if lines else ''}"


def starts(executable: str, env: dict | None = None) -> tuple[bool, str]:
    """Whether ``executable --version`` answers (a Chromium that at least starts)."""
    return _run([executable, "--version"], VERSION_TIMEOUT, env)


def playwright_chromium() -> str | None:
    """The Chromium that Playwright installed for its pinned version, if it is on disk."""
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            path = p.chromium.executable_path
    except Exception:  # noqa: BLE001 - no Playwright driver: nothing installed by it either
        return None
    return path if path and Path(path).exists() else None


def provision(env: dict | None = None, system_paths: Sequence[str] = SYSTEM_PATHS,
              is_root: bool | None = None, installed_by_playwright: Callable[[], str | None] = playwright_chromium,
              playwright_install: Sequence[str] | None = None, install: bool = True) -> BrowserState:
    """Find or install Chromium; see the module docstring for the order.

    Parameters
    ----------
    env : dict, optional
        The environment to search (``PATH``, ``QBOOK_CHROMIUM``) and to run installers in;
        defaults to ``os.environ``.
    system_paths : sequence of str
        Fixed locations checked before ``PATH``.
    is_root : bool, optional
        Whether installing system packages is allowed; defaults to ``os.geteuid() == 0``.
    installed_by_playwright : callable
        Returns the path of a Chromium Playwright installed, or None.
    playwright_install : sequence of str, optional
        Playwright's installer command; defaults to ``python -m playwright install chromium``.
    install : bool
        False only looks (steps 1 and 2).
    """
    env = dict(os.environ if env is None else env)
    is_root = (os.geteuid() == 0) if is_root is None else is_root
    tried: list[str] = []

    def usable(path: str | None, what: str) -> str | None:
        if not path:
            return None
        ok, answer = starts(path, env)
        tried.append(f"{what}: {path} ({answer})" if ok else f"{what}: {path} does not start ({answer})")
        return path if ok else None

    def look() -> str | None:
        if env.get("QBOOK_CHROMIUM"):
            found = usable(env["QBOOK_CHROMIUM"], "$QBOOK_CHROMIUM")
            if found:
                return found
        for path in system_paths:
            if Path(path).exists():
                found = usable(path, "system Chromium")
                if found:
                    return found
        for name in PATH_NAMES:
            path = shutil.which(name, path=env.get("PATH", ""))
            if path:
                found = usable(path, f"`{name}` on PATH")
                if found:
                    return found
        return usable(installed_by_playwright(), "Playwright's Chromium")

    found = look()
    if found or not install:
        if not found:
            tried.append("looked for a Chromium (system paths, PATH, Playwright's): none")
        return BrowserState(found, tried, None if found else _fix(is_root, env))
    tried.append("looked for a Chromium (system paths, PATH, Playwright's): none")

    apt = shutil.which("apt-get", path=env.get("PATH", ""))
    if is_root and apt:
        apt_env = dict(env, DEBIAN_FRONTEND="noninteractive")
        for command in APT_INSTALL:
            ok, answer = _run([apt, *command[1:]], INSTALL_TIMEOUT, apt_env)
            tried.append(f"`{' '.join(command)}`: {'done' if ok else answer}")
            if not ok:
                break
        else:
            found = look()
            if found:
                return BrowserState(found, tried)
    elif apt:
        tried.append("apt-get install chromium: skipped (not root)")
    else:
        tried.append("apt-get install chromium: skipped (no apt-get)")

    command = list(playwright_install or (sys.executable, "-m", "playwright", "install", "chromium"))
    ok, answer = _run(command, INSTALL_TIMEOUT, env)
    tried.append(f"`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(command))}`: "
                 f"{'done' if ok else answer}")
    if ok:
        found = look()
        if found:
            return BrowserState(found, tried)
    return BrowserState(None, tried, _fix(is_root, env))


def _fix(is_root: bool, env: dict) -> str:
    """The one command that would give this machine a Chromium."""
    if shutil.which("apt-get", path=env.get("PATH", "")):
        return "apt-get install chromium" if is_root else "sudo apt-get install chromium"
    return "QBOOK_CHROMIUM=/path/to/chromium make test  (any Chromium or Chrome you have)"


def save(state: BrowserState, path: Path = STATE_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(state), indent=2) + "\n")


def recorded_browser(path: Path = STATE_FILE) -> BrowserState:
    """The browser the setup step recorded, if it is still there; otherwise one looked up now
    (no installs), or the recorded failure if none turns up."""
    state = BrowserState(**json.loads(path.read_text())) if path.exists() else None
    if state is not None and state.executable and Path(state.executable).exists():
        return state
    looked = provision(install=False)
    return looked if looked.executable or state is None or state.executable else state


def main() -> int:
    if STATE_FILE.exists() and not os.environ.get("QBOOK_CHROMIUM"):  # keep a browser that still starts
        previous = BrowserState(**json.loads(STATE_FILE.read_text()))
        if previous.executable and starts(previous.executable)[0]:
            print(f"browser check: {previous.executable}")
            return 0
    state = provision()
    save(state)
    if state.executable:
        print(f"browser check: {state.executable}")
    else:
        print(f"browser check: {state.failure_message()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
