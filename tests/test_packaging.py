"""The wheel ships every package: pyproject's explicit package list names each folder of runtime/
and toolchain/ that holds an __init__.py (an editable install finds a missing one anyway, so only
this check catches it before a user's `pip install .` does)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("pocketlm", *init.parent.relative_to(ROOT).parts))
             for top in ("runtime", "toolchain") for init in (ROOT / top).rglob("__init__.py")}
    assert found == listed, (sorted(found - listed), sorted(listed - found))
