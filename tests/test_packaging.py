"""The wheel: one top-level package, every subpackage in it, imported like the checkout.

Packaging does not depend on the transformers version: CI runs this once, on the newest release.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_one_top_level_package_and_imports_like_the_checkout(tmp_path):
    """reports/ and dashboards/ sit beside probe/ in the checkout but install as probe.reports and
    probe.dashboards: the wheel's only top-level name is probe, every subpackage of the source
    is in it, and the same imports work from the wheel and from a bare checkout."""
    import zipfile

    import setuptools

    need = re.search(r'"setuptools>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    have = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    if have < tuple(int(p) for p in need.split(".")[:2]):
        pytest.skip(f"building the wheel here (no build isolation: no network) needs setuptools>={need}; "
                    f"this interpreter has {setuptools.__version__}")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=600)
    (whl,) = wheels.glob("genprobe-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    top = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(whl).read(top).decode().split() == ["probe"]
    assert {n.split("/")[0] for n in names if not n.startswith("genprobe-")} == {"probe"}
    source_packages = {str(p.parent.relative_to(ROOT)).replace("probe/", "", 1) for p in ROOT.glob("probe/**/__init__.py")}
    source_packages |= {"reports", "dashboards"}
    for pkg in source_packages - {"probe"}:
        assert f"probe/{pkg}/__init__.py" in names, f"{pkg} is missing from the wheel (pyproject's packages)"
    assert "probe/dashboards/app.py" in names and "probe/reports/terminal.py" in names
    assert "probe/assets/tokenizer.model" in names
    # the same imports from the wheel (unpacked as pip installs it) and from the checkout alone
    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    probe_imports = ("import importlib.util as u, probe; "
                     "print(probe.__file__); "
                     "print(u.find_spec('probe.reports.html').origin); print(u.find_spec('probe.dashboards.app').origin)")
    for where, path in (("wheel", site), ("checkout", ROOT)):
        out = subprocess.run([sys.executable, "-S", "-c", probe_imports], cwd=tmp_path, capture_output=True, text=True,
                             env={"PYTHONPATH": str(path), "PATH": os.environ.get("PATH", "")}, timeout=120)
        assert out.returncode == 0, (where, out.stderr)
        lines = out.stdout.split()
        assert all(line.startswith(str(path)) for line in lines), (where, lines)
