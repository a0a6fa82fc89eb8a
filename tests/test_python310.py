"""mauctl on Python 3.10, the oldest version it supports (pyproject's requires-python, the README).

The suite runs on Python 3.11 with torch. A torch wheel for 3.10 is a download of several GB that
the local wheel cache does not hold, so the 3.10 check installs mauctl without torch: its other
dependencies, then mauctl itself from this source tree with ``pip install --no-deps``. It then runs
what needs no torch: ``import mauctl.config``, every preset loaded, ``mauctl --help`` and each
command's ``--help``, ``mauctl presets``, ``mauctl report`` and ``mauctl status`` (a login node's
command) on an empty folder. Those paths import no torch; the first test checks that on this
interpreter, where torch is installed and an import of it would otherwise go unnoticed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import mauctl_env
from mauctl.compat import tomllib

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "numpy", "PIL", "sklearn", "safetensors")
# not installed on 3.10: torch (several GB) and what only training, the demo and export import
LEFT_OUT = {"torch", "torchvision", "scikit-learn", "safetensors"}

# Run in a fresh interpreter (this one, or the 3.10 venv's), in an empty folder: every command that needs no
# torch through the console script's own main(), in one process, then which modules of HEAVY that imported.
PROBE = r'''
import json, os, sys
from pathlib import Path


class Exited(BaseException):
    """main() ends in os._exit (worker.fast_exit); raised instead, so that the next command runs."""


def exit_here(code):
    raise Exited(code)


os._exit = exit_here
import mauctl
import mauctl.config
from mauctl import cli, presets
import typer

loaded = [p.name for p in presets.all_presets()]
commands = sorted(typer.main.get_command(cli.app).commands)
codes = {}
for argv in [["--help"], ["--version"], ["presets"], ["report", "."], ["status", "."]] + [[c, "--help"]
                                                                                 for c in commands]:
    sys.argv = ["mauctl", *argv]
    try:
        cli.main()
    except Exited as exc:
        codes[" ".join(argv)] = exc.args[0]
heavy = [m for m in json.loads(os.environ["PROBE_HEAVY"]) if m in sys.modules]
Path(os.environ["PROBE_OUT"]).write_text(json.dumps(
    {"mauctl": mauctl.__file__, "presets": loaded, "commands": commands, "exit": codes, "heavy": heavy}))
'''


def probe(python: str, tmp_path: Path, env: dict[str, str]) -> dict:
    """What PROBE saw: mauctl's path, the presets, the commands, each one's exit status, HEAVY imported."""
    out, empty = tmp_path / "probe.json", tmp_path / "empty"
    empty.mkdir()
    env = {**env, "PROBE_OUT": str(out), "PROBE_HEAVY": json.dumps(HEAVY)}
    result = subprocess.run([python, "-c", PROBE], cwd=empty, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and out.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def assert_all_ran(seen: dict) -> None:
    presets = sorted(p.stem for p in (REPO / "presets").glob("*.toml"))
    assert seen["presets"] == presets
    assert {"pretrain", "lincls", "presets", "report"} <= set(seen["commands"])
    assert seen["exit"] and set(seen["exit"].values()) == {0}, seen["exit"]


def test_help_presets_and_report_import_no_torch(tmp_path):
    seen = probe(sys.executable, tmp_path, mauctl_env(PYTHONPATH=str(REPO)))
    assert_all_ran(seen)
    assert seen["heavy"] == [], f"`mauctl --help`, `presets`, `report` or `status` imported {seen['heavy']}"


def python310() -> tuple[str | None, str]:
    """A Python 3.10 interpreter (on PATH, or pyenv's), or None and why not."""
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")), reverse=True)
    candidates = [shutil.which("python3.10"), *pyenv]
    tried = []
    for candidate in filter(None, candidates):
        # pyenv's shim is on PATH even when 3.10 is not an active version, and then it fails: try each
        result = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                                capture_output=True, text=True, timeout=60)
        if result.stdout.strip() == "True":
            return candidate, ""
        tried.append(candidate)
    where = f"(tried {', '.join(tried)})" if tried else "on PATH or under ~/.pyenv"
    return None, f"no working python3.10 {where}"


# pip's words when it cannot reach the registry; not "No matching distribution", which a real 3.10 break
# (a dependency that left 3.10 behind) says too
NO_NETWORK = ("Failed to establish a new connection", "Temporary failure in name resolution",
              "Network is unreachable", "Connection refused", "ProxyError", "ConnectTimeout", "ReadTimeout",
              "Max retries exceeded")


def pip(python: Path, *args: str) -> None:
    """``pip install ARGS`` in the venv; a skip when the package registry cannot be reached."""
    try:
        result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--retries", "2", *args],
                                capture_output=True, text=True, timeout=600, env=venv_env())
    except subprocess.TimeoutExpired:
        pytest.skip("pip install got no answer from the package registry in 10 minutes")
    if result.returncode != 0:
        output = result.stdout + result.stderr
        offline = [line for line in output.splitlines() if any(sign in line for sign in NO_NETWORK)]
        if offline:
            pytest.skip(f"pip could not reach the package registry: {offline[-1].strip()}")
        raise AssertionError(f"pip install {' '.join(args)} failed:\n{output[-4000:]}")


def venv_env() -> dict[str, str]:
    # the venv must see its own mauctl, not this source tree (PYTHONPATH) or this interpreter's packages
    return {k: v for k, v in mauctl_env().items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def dependencies_without_torch() -> list[str]:
    """pyproject's dependencies (with their version ranges and markers), less LEFT_OUT."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    requirements = pyproject["project"]["dependencies"]
    kept = [r for r in requirements if re.match(r"[A-Za-z0-9._-]+", r)[0].lower() not in LEFT_OUT]
    assert any(r.startswith("tomli") for r in kept), "tomli is what mauctl reads TOML with on 3.10"
    return kept


@pytest.mark.slow
def test_mauctl_installs_and_runs_without_torch_on_python_3_10(tmp_path):
    python, why = python310()
    if python is None:
        pytest.skip(why)
    venv = tmp_path / "venv310"
    made = subprocess.run([python, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
    if made.returncode != 0:
        pytest.skip(f"{python} cannot make a venv: {(made.stdout + made.stderr).strip()[-500:]}")
    venv_python = venv / "bin" / "python"
    pip(venv_python, *dependencies_without_torch())
    pip(venv_python, "--no-deps", str(REPO))  # a build from the source tree, as from a fresh clone

    seen = probe(str(venv_python), tmp_path, venv_env())
    assert Path(seen["mauctl"]).is_relative_to(venv), seen["mauctl"]  # the installed copy, not this tree
    assert_all_ran(seen)
    assert seen["heavy"] == []
    for args, expected in ((["--help"], "Usage: mauctl"), (["presets"], "v2-b128")):
        result = subprocess.run([str(venv / "bin" / "mauctl"), *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120, env=venv_env())
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert expected in result.stdout
