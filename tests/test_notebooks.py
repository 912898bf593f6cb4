"""Chapters are stored clean, with a current setup cell, and listed in the book."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import notebooks  # noqa: E402

CHAPTER_PATHS = notebooks.chapter_paths()


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [
        entry["file"] for part in toc["parts"] for entry in part.get("chapters", [])
    ]


def test_chapters_exist() -> None:
    assert CHAPTER_PATHS, "no notebooks under chapters/"


@pytest.mark.parametrize("path", CHAPTER_PATHS, ids=lambda path: path.name)
def test_notebook_is_clean(path: Path) -> None:
    assert notebooks.problems(path) == []


@pytest.mark.parametrize("path", CHAPTER_PATHS, ids=lambda path: path.name)
def test_chapter_in_toc(path: Path) -> None:
    assert f"chapters/{path.stem}" in toc_files()


@pytest.mark.parametrize("path", CHAPTER_PATHS, ids=lambda path: path.name)
def test_chapter_number_in_title(path: Path) -> None:
    number = int(path.name.split("_")[0])
    notebook = notebooks.load(path)
    titles = [
        line
        for cell in notebook["cells"]
        if cell["cell_type"] == "markdown"
        for line in "".join(cell["source"]).splitlines()
        if line.startswith("# ")
    ]
    assert titles, f"{path.name} has no '# ' title"
    assert titles[0].startswith(f"# {number}. ")


def test_toc_lists_only_existing_pages() -> None:
    for name in toc_files():
        candidates = [ROOT / f"{name}{suffix}" for suffix in (".md", ".ipynb")]
        assert any(candidate.exists() for candidate in candidates), name


def test_benchmarks_page_is_clean() -> None:
    page = notebooks.load(ROOT / "performance.ipynb")
    code_cells = [cell for cell in page["cells"] if cell["cell_type"] == "code"]
    assert code_cells
    assert all(not cell["outputs"] for cell in code_cells)
    assert all(cell["execution_count"] is None for cell in code_cells)
