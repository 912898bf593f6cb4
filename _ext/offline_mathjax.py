"""Serve MathJax 3 from the site itself, so formulas render with no network.

Sphinx's default loads MathJax from a CDN. This extension copies MathJax's
``es5`` folder from the pinned PyPI package ``django-static-mathjax`` (MathJax
3.2.2, the major version Sphinx's mathjax extension expects) into
``_static/mathjax`` and points ``mathjax_path`` at it.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config

MATHJAX_ENTRY = "mathjax/tex-chtml.js"


def _mathjax_source() -> Path:
    source = Path(str(files("mathjax"))) / "static" / "mathjax" / "es5"
    if not (source / "tex-chtml.js").is_file():
        raise FileNotFoundError(
            f"MathJax's tex-chtml.js not found under {source}; install the "
            "pinned django-static-mathjax from requirements.txt"
        )
    return source


def _use_local_mathjax(app: Sphinx, config: Config) -> None:
    config.mathjax_path = MATHJAX_ENTRY


def _copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    shutil.copytree(_mathjax_source(), target, dirs_exist_ok=True)


def setup(app: Sphinx) -> dict:
    _mathjax_source()  # fail at the start of the build, not at its end
    app.connect("config-inited", _use_local_mathjax)
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
