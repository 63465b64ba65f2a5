"""The package metadata a fresh install reads: an SPDX license string, and the extras that the
README's notification channels need."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_is_an_spdx_string() -> None:
    assert PROJECT["license"] == "Apache-2.0"  # a table gives setuptools' deprecation boxes at every build


def test_the_extras_install_what_the_readme_channels_need() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "MQTT" in readme
    for extra in ("alerts", "edge"):
        names = {re.split(r"[<>=\[ ]", dep)[0] for dep in PROJECT["optional-dependencies"][extra]}
        assert {"apprise", "paho-mqtt"} <= names, extra


def test_the_install_script_says_what_it_installs(tmp_path) -> None:
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "python").write_text("#!/bin/sh\nexit 0\n")
    (fake / "python").chmod(0o755)
    res = subprocess.run([str(ROOT / "scripts" / "install.sh")], env={"VENV": str(tmp_path / "venv"),
                         "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    steps = [line for line in res.stderr.splitlines() if line.startswith("install [")]
    assert len(steps) == 3 and "takes about a minute" in steps[1]
