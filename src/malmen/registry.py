"""Editors and classifier heads shipped inside the package, resolved by name (``--editor smollm2-zsre``)."""
from __future__ import annotations

import json
from pathlib import Path

from .formats import EDITOR_FILE, HEAD_FILE

SHIPPED = Path(__file__).parent / "editors"
HEADS = Path(__file__).parent / "heads"  # classifier heads shipped with the package
DEFAULT_MODEL = "smollm2-135m"  # the model every command uses unless told otherwise


def shipped() -> list[str]:
    return sorted(p.name for p in SHIPPED.iterdir() if (p / EDITOR_FILE).is_file()) if SHIPPED.is_dir() else []


def resolve_editor(name: str | Path) -> Path:
    """A directory holding editor.json, or the name of a shipped editor."""
    path = Path(name)
    if (path / EDITOR_FILE).is_file():
        return path
    if (SHIPPED / str(name) / EDITOR_FILE).is_file():
        return SHIPPED / str(name)
    names = ", ".join(shipped()) or "none"
    raise FileNotFoundError(f"{name}: no {EDITOR_FILE} there and no shipped editor of that name (shipped: {names})")


def classifier_head(name: str) -> Path | None:
    """The directory of a classifier head: a shipped head's name or a directory with head.json
    (no torch: the command line asks before loading anything)."""
    for path in (HEADS / name, Path(name)):
        if (path / HEAD_FILE).is_file():
            return path
    return None


FORMAT = "malmen-editor"


def editor_config(name: str | Path) -> dict:
    """editor.json of an editor directory or shipped name, checked for our format.

    Reads JSON only (no torch), so that the command line can check an editor before loading a model.
    """
    path = resolve_editor(name)
    try:
        meta = json.loads((path / EDITOR_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}/{EDITOR_FILE}: cannot read JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}/{EDITOR_FILE}: not a malmen editor (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta
