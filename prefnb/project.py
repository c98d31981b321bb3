"""Where the project is: every command (study, run, train, paper, verify, params, data) agrees.

The project is the nearest folder, from the working directory upward, that holds both
``params/`` and ``notebooks/``; outside any project, the checkout the package was installed
from (an editable install), else the working directory. Its ``outputs/`` and ``paper/`` are
what `prefnb study` writes and `prefnb paper` / `prefnb verify` read, so a second clone of the
project, used from inside it, never reads or writes the first one's outputs.
"""

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
