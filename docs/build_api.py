"""Build the API reference from the docstrings: ``python docs/build_api.py [OUTPUT_DIR]``.

Every module of the ``synthpipe`` package is rendered with pdoc (Google-style
docstrings: Args / Returns / Raises) into ``OUTPUT_DIR`` (default ``docs/api``, which
is not kept in git). Each module shows what its ``__all__`` names. The build fails
(exit code 1) on any warning pdoc gives (a module that does not import, a reference or
annotation it cannot resolve, a malformed docstring section), so CI keeps the docs
buildable.
"""
from __future__ import annotations

import os
import pkgutil
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def modules() -> list[str]:
    """``synthpipe`` and every module under it, skipping ``__main__`` entry points."""
    import synthpipe

    names = ["synthpipe"]
    for info in pkgutil.walk_packages(synthpipe.__path__, "synthpipe."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return names


def specs() -> list[str]:
    """:func:`modules` as pdoc's module list: pdoc adds the submodules of a package without
    ``__all__`` on its own, and warns when one is named again, so those are left out."""
    from pdoc.extract import walk_specs

    chosen: list[str] = []
    for name in modules():
        if not chosen or name not in walk_specs(chosen):
            chosen.append(name)
    return chosen


def build(output: Path) -> list[str]:
    """Render the API pages into ``output``; returns pdoc's warnings (empty when clean)."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="google", show_source=False, search=True)
    pdoc_dir = os.path.dirname(pdoc.__file__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*specs(), output_directory=output)
    return [f"{w.category.__name__}: {w.message}" for w in caught if w.filename.startswith(pdoc_dir)]


def main(argv: list[str]) -> int:
    output = Path(argv[0]) if argv else HERE / "api"
    problems = build(output)
    for line in problems:
        print(f"docs: {line}", file=sys.stderr)
    if problems:
        print(f"docs: {len(problems)} warning(s); the API reference must build cleanly", file=sys.stderr)
        return 1
    print(f"docs: API reference for {len(modules())} modules written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
