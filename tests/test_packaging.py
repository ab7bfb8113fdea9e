"""Every Python package folder ships in the wheel (a deployed device imports from it)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = {ROOT / d for d in cfg["package-dir"].values()}
    assert set(cfg["packages"]) == set(cfg["package-dir"])
    for top in ("models", "compiler", "kernels", "runtime", "tools", "device_tests"):
        for init in (ROOT / top).rglob("__init__.py"):
            assert init.parent in listed, f"{init.parent.relative_to(ROOT)} is missing from pyproject.toml"
