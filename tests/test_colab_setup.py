"""The chapters' setup cell, run as on a bare Colab runtime.

One chapter is copied alone into an empty folder and its setup cell runs in a
fresh virtualenv. A local git repository tagged with the book's version
replaces the remote one: git's ``url.<base>.insteadOf`` redirects the
URL from ``_config.yml`` to it, so the cell itself runs unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import notebooks  # noqa: E402

# A chapter that reads the pretrained model, so the data install runs too.
CHAPTER = "chapters/05_contextual_embeddings.ipynb"


def run(command: list[str], cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{command} failed with exit code {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def make_remote(destination: Path) -> None:
    """Copy the working tree (tracked and unignored files) into a tagged repo."""
    listed = run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
    )
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    run(["git", "init", "--quiet", "--initial-branch=main"], cwd=destination)
    run(["git", "add", "--all"], cwd=destination)
    run([*git, "commit", "--quiet", "-m", "snapshot"], cwd=destination)
    run([*git, "tag", notebooks.book_version()], cwd=destination)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_setup_cell_installs_book_utils(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    make_remote(remote)

    workdir = tmp_path / "colab"
    workdir.mkdir()
    chapter = workdir / Path(CHAPTER).name
    shutil.copy2(ROOT / CHAPTER, chapter)
    setup_cell = notebooks.first_code_cell(json.loads(chapter.read_text()))
    (workdir / "setup_cell.py").write_text("".join(setup_cell["source"]))

    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = str(environment / "bin" / "python")

    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.update(
        GIT_CONFIG_COUNT="1",
        GIT_CONFIG_KEY_0=f"url.file://{remote}.insteadOf",
        GIT_CONFIG_VALUE_0=notebooks.repository_url(),
    )
    run([python, "setup_cell.py"], cwd=workdir, env=env)

    probe = (
        "import importlib.metadata, book_utils, book_utils.attention; "
        "print(importlib.metadata.version('book_utils'))"
    )
    installed = run([python, "-c", probe], cwd=workdir, env=env).strip()
    assert installed == notebooks.book_version().removeprefix("v")

    # A second run finds everything installed and does nothing.
    rerun = run([python, "setup_cell.py"], cwd=workdir, env=env)
    assert "Restart" not in rerun
