"""The browser provisioning of `make test`'s setup, on a faked machine with no Chromium visible.

Every outside effect of :func:`provision_browser.provision` is a parameter: ``PATH`` points at a
folder of fake executables (shell scripts), the system locations are empty, root is a flag, and
the installers are fakes that record how they were called and "install" a fake Chromium.
"""

import json
import stat

import provision_browser as pb


def script(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_chromium(folder, name="chromium", works=True):
    # like Debian's launcher script, a working one may also warn on stderr
    return script(folder, name, 'echo "launcher: unexpected operator" >&2; echo "Chromium 156.0 (fake)"' if works
                  else 'echo "cannot open display" >&2; exit 1')


def machine(tmp_path):
    """An empty bin folder on PATH, and a log the fake installers append to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    return bin_dir, tmp_path / "calls.log", {"PATH": str(bin_dir)}


def failing_installer(tmp_path, log):
    return [str(script(tmp_path, "pw-install", f'echo "playwright $*" >> {log}; echo "ECONNREFUSED cdn" >&2; exit 1'))]


def test_nothing_found_says_what_was_tried_and_the_fix(tmp_path):
    bin_dir, log, env = machine(tmp_path)
    state = pb.provision(env, system_paths=(), is_root=False, installed_by_playwright=lambda: None,
                         playwright_install=failing_installer(tmp_path, log))
    assert state.executable is None
    assert len(state.tried) == 3
    assert "none" in state.tried[0]
    assert "skipped (no apt-get)" in state.tried[1]
    assert "ECONNREFUSED" in state.tried[2] and "exit 1" in state.tried[2]
    assert log.read_text().strip() == "playwright"   # the installer was really run
    message = state.failure_message()
    assert "Tried:" in message and "QBOOK_CHROMIUM=" in message and "make test" in message


def test_not_root_with_apt_get_skips_it_and_proposes_sudo(tmp_path):
    bin_dir, log, env = machine(tmp_path)
    script(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}')
    state = pb.provision(env, system_paths=(), is_root=False, installed_by_playwright=lambda: None,
                         playwright_install=failing_installer(tmp_path, log))
    assert state.executable is None
    assert any("skipped (not root)" in t for t in state.tried)
    assert "apt-get" not in log.read_text()            # never called without root
    assert state.fix == "sudo apt-get install chromium"


def test_a_chromium_on_path_is_used_and_nothing_is_installed(tmp_path):
    bin_dir, log, env = machine(tmp_path)
    script(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}')
    chromium = fake_chromium(bin_dir, "chromium-browser")
    state = pb.provision(env, system_paths=(), is_root=True, installed_by_playwright=lambda: None,
                         playwright_install=failing_installer(tmp_path, log))
    assert state.executable == str(chromium)
    assert state.tried[-1].endswith("(Chromium 156.0 (fake))")   # the version, not the warning
    assert not log.exists()


def test_system_path_comes_first(tmp_path):
    bin_dir, log, env = machine(tmp_path)
    system = fake_chromium(tmp_path, "system-chromium")
    fake_chromium(bin_dir)
    state = pb.provision(env, system_paths=(str(system),), is_root=False, installed_by_playwright=lambda: None)
    assert state.executable == str(system)


def test_a_chromium_that_does_not_start_is_skipped(tmp_path):
    bin_dir, log, env = machine(tmp_path)
    broken = fake_chromium(bin_dir, "chromium", works=False)
    working = fake_chromium(bin_dir, "google-chrome")
    state = pb.provision(env, system_paths=(), is_root=False, installed_by_playwright=lambda: None)
    assert state.executable == str(working)
    assert any(str(broken) in t and "does not start" in t and "cannot open display" in t for t in state.tried)


def test_root_with_apt_get_installs_debian_chromium(tmp_path):
    bin_dir, log, env = machine(tmp_path)
    # the fake apt-get "installs" chromium into the folder on PATH, as Debian's package would
    script(bin_dir, "apt-get", f'echo "apt-get $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> {log}\n'
                               f'if [ "$1" = install ]; then printf \'#!/bin/sh\\necho Chromium 156\\n\' > {bin_dir}/chromium; '
                               f'/bin/chmod +x {bin_dir}/chromium; fi')
    state = pb.provision(env, system_paths=(), is_root=True, installed_by_playwright=lambda: None,
                         playwright_install=failing_installer(tmp_path, log))
    assert state.executable == str(bin_dir / "chromium")
    calls = log.read_text().splitlines()
    assert calls[0] == "apt-get update -q DEBIAN_FRONTEND=noninteractive"
    assert calls[1].startswith("apt-get install -y -q") and "chromium" in calls[1]
    assert len(calls) == 2                              # Playwright's installer was not needed


def test_apt_get_failing_falls_back_to_playwrights_installer(tmp_path):
    bin_dir, log, env = machine(tmp_path)
    script(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}; echo "E: Unable to locate package" >&2; exit 100')
    installed = tmp_path / "ms-playwright" / "chrome"
    installer = script(tmp_path, "pw-install", f'echo "playwright $*" >> {log}; /bin/mkdir -p {installed.parent}; '
                                               f'printf \'#!/bin/sh\\necho Chromium 1200\\n\' > {installed}; '
                                               f'/bin/chmod +x {installed}')
    state = pb.provision(env, system_paths=(), is_root=True,
                         installed_by_playwright=lambda: str(installed) if installed.exists() else None,
                         playwright_install=[str(installer), "install", "chromium"])
    assert state.executable == str(installed)
    assert any("exit 100" in t and "Unable to locate" in t for t in state.tried)
    assert log.read_text().splitlines()[-1] == "playwright install chromium"


def test_qbook_chromium_overrides(tmp_path):
    bin_dir, log, env = machine(tmp_path)
    fake_chromium(bin_dir)
    mine = fake_chromium(tmp_path, "my-chrome")
    state = pb.provision(dict(env, QBOOK_CHROMIUM=str(mine)), system_paths=(), is_root=False,
                         installed_by_playwright=lambda: None)
    assert state.executable == str(mine)


def test_look_only_never_installs(tmp_path):
    bin_dir, log, env = machine(tmp_path)
    script(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}')
    state = pb.provision(env, system_paths=(), is_root=True, installed_by_playwright=lambda: None,
                         playwright_install=failing_installer(tmp_path, log), install=False)
    assert state.executable is None and state.fix == "apt-get install chromium"
    assert not log.exists()


def test_recorded_state_round_trip_and_stale_executable(tmp_path, monkeypatch):
    bin_dir, log, env = machine(tmp_path)
    chromium = fake_chromium(bin_dir)
    state_file = tmp_path / "browser.json"
    pb.save(pb.BrowserState(str(chromium), ["found"]), state_file)
    assert json.loads(state_file.read_text())["executable"] == str(chromium)
    assert pb.recorded_browser(state_file).executable == str(chromium)
    # the recorded browser has gone: look again (without installing), here finding nothing
    chromium.unlink()
    monkeypatch.setattr(pb, "provision", lambda install=True: pb.BrowserState(None, ["looked"], "fix it"))
    assert pb.recorded_browser(state_file).tried == ["looked"]
