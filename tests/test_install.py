"""The install lines name extras pyproject.toml provides, spelled as pip normalises them
(PEP 685: a requested ``lm_eval`` becomes ``lm-eval``; an extra declared as ``lm_eval`` is
reported missing by a pip / setuptools pair that normalises one side only)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# every file that tells someone how to install sieve-pl with extras
INSTALL_FILES = ("install.sh", "README.md", "Dockerfile", ".ci/run", "sieve_pl/stages/lm_eval.py")


def _extras() -> set[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["optional-dependencies"])


def test_extras_are_spelled_as_pip_normalises_them():
    for extra in _extras():
        assert extra == re.sub(r"[-_.]+", "-", extra).lower(), extra


def test_install_lines_name_extras_that_exist():
    extras, named = _extras(), set()
    for name in INSTALL_FILES:
        text = (ROOT / name).read_text()
        groups = re.findall(r"(?:\.|sieve-pl)\[([\w,.\- ]+)\]", text)
        groups += re.findall(r"SIEVE_PL_EXTRAS[-=]([\w,.\-]+)", text)  # install.sh's list
        for group in groups:
            named |= {(name, extra.strip()) for extra in group.split(",")}
    # install.sh installs all three by default
    assert {extra for n, extra in named if n == "install.sh"} >= {"test", "lm-eval", "llama-cpp"}
    assert {(name, extra) for name, extra in named if extra not in extras} == set()
