"""Where the project is, the same for every command (the README's "The paper" says why): the
nearest folder, from the working directory upward, that holds ``params/`` and ``notebooks/``;
outside any project, the checkout the package was installed from, else the working directory."""

from __future__ import annotations

from pathlib import Path

MARKERS = ("params", "notebooks")


def is_project(folder: Path) -> bool:
    return all((folder / name).is_dir() for name in MARKERS)


def find_project(start: str | Path | None = None) -> Path:
    """The project folder for a command started in ``start`` (default: the working directory)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if is_project(folder):
            return folder
    checkout = Path(__file__).resolve().parent.parent
    return checkout if is_project(checkout) else here


def outputs_dir(start: str | Path | None = None) -> Path:
    """The project's outputs/ (runs, report, cache)."""
    return find_project(start) / "outputs"


def paper_dir(start: str | Path | None = None) -> Path:
    """The project's Quarto paper/."""
    return find_project(start) / "paper"
