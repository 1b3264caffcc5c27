"""Editors shipped inside the package, resolved by name (``--editor smollm2-zsre``)."""
from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).parent / "editors"


def shipped() -> list[str]:
    return sorted(p.name for p in SHIPPED.iterdir() if (p / "editor.json").is_file()) if SHIPPED.is_dir() else []


def resolve_editor(name: str | Path) -> Path:
    """A directory holding editor.json, or the name of a shipped editor."""
    path = Path(name)
    if (path / "editor.json").is_file():
        return path
    if (SHIPPED / str(name) / "editor.json").is_file():
        return SHIPPED / str(name)
    names = ", ".join(shipped()) or "none"
    raise FileNotFoundError(f"{name}: no editor.json there and no shipped editor of that name (shipped: {names})")
