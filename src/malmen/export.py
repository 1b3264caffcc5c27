"""Re-store a saved editor with its hyper-network's low-rank factors in another dtype (``malmen export``).

An editor's file is nearly all low-rank factors (``Block.FACTORS``); in float16 it takes half the
bytes, which matters for editors shipped in the package. Files only: no model is loaded. The
optimizer state of a training checkpoint (``last/``) is not carried: an exported editor is for
editing, or for a new training run from it (``train --init-editor``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import io, registry
from .editor import EditorConfig
from .formats import EDITOR_FILE, EDITOR_PRIOR, EDITOR_WEIGHTS
from .hypernet import HyperNetwork
from .keystats import flat_prior

FACTOR_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export_editor(source: str | Path, out: str | Path, factor_dtype: str = "float16", command: str | None = None,
                  prior: tuple[dict, dict] | None = None, lambda_scale: float | None = None,
                  prior_mix: float | None = None, hypernet: HyperNetwork | None = None) -> Path:
    """Write the editor ``source`` (a directory or shipped name) to ``out`` with its factors stored in
    ``factor_dtype``, atomically; every other entry of editor.json and every other tensor (a kept
    prior too) is kept, and ``command`` (the export's, as typed) is added to its ``commands``.
    ``prior``: a kept regulariser shape and its record (``MalmenEditor.keep_prior``) to store
    instead, with the regulariser set to 'keys'. ``lambda_scale``: the factor on the learned regularisers
    to store (``EditorConfig.lambda_scale``; None keeps the source's); ``prior_mix``, the identity's share
    beside a shaped regulariser, likewise (``EditorConfig.prior_mix``). ``hypernet``: the source's
    hyper-network where a caller has it loaded already (the editor that kept ``prior``), so that its
    file is not read a second time.

    Returns ``out``. Loading the result (``MalmenEditor.from_pretrained``) casts the factors back to
    float32, so the edit differs from the source's only by their rounding."""
    if factor_dtype not in FACTOR_DTYPES:
        raise ValueError(f"factor dtype {factor_dtype!r}: one of {', '.join(FACTOR_DTYPES)}")
    path = registry.resolve_editor(source)
    meta = registry.editor_config(path)
    settings = {"lambda_scale": None if lambda_scale is None else float(lambda_scale),
                "prior_mix": None if prior_mix is None else float(prior_mix),
                "regulariser": "keys" if prior is not None else None}
    meta = {**meta, "stored_factors": factor_dtype,
            "config": {**meta["config"], **{k: v for k, v in settings.items() if v is not None}}}
    config = EditorConfig.from_dict(meta["config"]).check()  # refused before anything is read or written
    if command is not None:
        meta["commands"] = [*meta.get("commands", []), command]
    if prior is not None:
        meta["kept_prior"] = prior[1]
    shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
    if hypernet is None:
        hypernet = HyperNetwork.from_file(path / EDITOR_WEIGHTS, shapes, config.hyper)
    elif hypernet.shapes != shapes:
        raise ValueError(f"the hyper-network given was built for {hypernet.shapes}, {path} for {shapes}")
    # the source is read in full first: out may be the source itself (atomic_dir replaces it only at
    # the end, so its files can still be copied); an out that is not an editor is refused
    with io.atomic_dir(out, marker=EDITOR_FILE) as tmp:
        io.save_tensors(tmp / EDITOR_WEIGHTS, hypernet.stored_state(FACTOR_DTYPES[factor_dtype]))
        if prior is not None:
            io.save_tensors(tmp / EDITOR_PRIOR, flat_prior(prior[0]))
        elif (path / EDITOR_PRIOR).is_file():  # the source's own kept shape travels as it is
            shutil.copyfile(path / EDITOR_PRIOR, tmp / EDITOR_PRIOR)
        io.write_json(tmp / EDITOR_FILE, meta)
    return Path(out)
