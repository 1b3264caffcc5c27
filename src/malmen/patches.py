"""Edit patches: what one batch of facts contributes to an edit, saved, shared, summed and undone.

MALMEN's solve needs only sums over tokens (KᵀK and KᵀD, solver.py), so edits compose: the sums of
two batches are the sums of their union.  A patch holds one batch's contribution, traced at the
base model's weights, so that patches do not depend on one another or on their order:

    patch = make_patch(editor, facts)              # traced at the base weights; nothing is edited
    patch.save("patches/2026-11-cities"); patch = Patch.load("patches/2026-11-cities")
    handle = apply_patches(model, [p1, p2, p3])    # one solve over the sum of the patches
    handle.add(p4)                                 # tracing p4's facts was all the new work
    handle.remove(p2)                              # the model that never had p2
    handle.revert()                                # the base model, bit for bit

A patch stores, per edited module, either the value differences of its tokens (fp16 by default;
few tokens) or, when those would be larger, the sums themselves (fp64), chosen from sizes; the
editor's regulariser; every fact's id, text and SHA-1 hashes of its prompt and target; and the
fingerprints of the editor and the base model.  The keys of a token-form patch are not written by
default: they are the base model's inputs to the edited modules at the facts' tokens, a function
of the base model and the facts' text, so applying traces them again (one forward pass over the
patch's facts, in the batches it was made in, cast to its dtype: the very keys it would have
stored).  That keeps a patch of 100 zsRE facts on SmolLM2 at 2.2 MiB (README, *Patches*); pass
``store_keys=True`` for a patch that applies without a forward pass (or with no tokenizer).  Files are safetensors plus JSON, written
atomically (``io.atomic_dir``).  Facts of different patches that share a prompt but not a target
are conflicts: applying refuses them, naming both patches, unless asked to let the newer patch
(later in the list) supersede the older fact, which needs the older patch in the token form.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from . import io
from .facts import Fact, distinct
from .formats import PATCH_FILE
from .hypernet import regulariser_at
from .models import model_identity, same_weights, weight_sample
from .solver import AGGREGATIONS, Tokens
from .solver import report as solver_report
from .tracing import KeyGradTrace

FORMAT = "malmen-patch"
VERSION = 2  # 2: keys optional (traced again when applied)
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def editor_fingerprint(editor) -> str:
    """SHA-256 of the hyper-network's weights and the editor's configuration: which editor made a patch."""
    digest = hashlib.sha256(repr(sorted(editor.config.to_dict().items())).encode())
    for name, tensor in sorted(editor.hypernet.state_dict().items()):
        if name == "lambda_exponent" and not tensor.any():
            continue  # alpha = 0 is every editor saved before alpha existed: their patches still match
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class PatchError(ValueError):
    """Patches that cannot be applied together (another editor or base model, a conflict)."""


@dataclass
class Patch:
    """One batch of facts' contribution to an edit (see the module docstring)."""

    meta: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str = "patch"

    @property
    def form(self) -> str:
        return self.meta["form"]

    @property
    def facts(self) -> list[dict]:
        return self.meta["facts"]

    @property
    def keys_stored(self) -> bool:
        """Whether the patch's files hold its keys (version 1 patches always did)."""
        return self.meta.get("keys_stored", True)

    @property
    def has_keys(self) -> bool:
        """Whether the keys are at hand (stored, traced when made, or traced again)."""
        return self.form != "tokens" or all(f"tokens/{m}/keys" in self.tensors for m in self.meta["editor"]["modules"])

    @property
    def has_norms(self) -> bool:
        """Whether |D|^2 and the token count are at hand for the solve's report (tokens: always;
        sums: patches made since the report was added carry them as ``sums/.../dd`` and ``.../n``)."""
        return self.form != "sums" or any(k.endswith("/dd") for k in self.tensors)

    def written(self) -> dict[str, torch.Tensor]:
        """The tensors the patch's files hold."""
        if self.keys_stored:
            return self.tensors
        return {k: v for k, v in self.tensors.items() if not k.endswith("/keys")}

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors written to disk."""
        return sum(t.numel() * t.element_size() for t in self.written().values())

    # --- files
    def save(self, path: str | Path) -> None:
        """patch.safetensors and patch.json in ``path``, written atomically."""
        with io.atomic_dir(path, marker=PATCH_FILE) as tmp:
            io.save_tensors(tmp / "patch.safetensors", self.written())
            io.write_json(tmp / PATCH_FILE, self.meta)

    @classmethod
    def read_meta(cls, path: str | Path) -> dict:
        """patch.json, checked for our format (no tensors read: cheap, for input checks)."""
        meta = io.read_json(Path(path) / PATCH_FILE)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}/{PATCH_FILE}: not a malmen patch (format {meta.get('format')!r})")
        return meta

    @classmethod
    def load(cls, path: str | Path) -> "Patch":
        return cls(cls.read_meta(path), io.load_tensors(Path(path) / "patch.safetensors"), name=str(path))

    # --- contents
    def trace_keys(self, adapter) -> None:
        """Trace the keys this patch does not store: its facts through ``adapter``'s model (which
        must have the base weights: callers suspend edits) in the micro-batches the patch was made
        in, cast to its dtype.  Refuses facts that tokenise to other key positions than recorded
        (another tokenizer than the patch's)."""
        from .editor import fact_batches

        if self.has_keys:
            return
        editor = self.meta["editor"]
        modules, where = editor["modules"], editor["keys"]
        facts = []
        for i, f in enumerate(self.facts):
            if sha1(f["prompt"]) != f["prompt_sha1"] or sha1(f["target"]) != f["target_sha1"]:
                raise PatchError(f"{self.name}: fact {i + 1} ({f['id']}): its text does not match its hashes")
            facts.append(Fact(f["prompt"], f["target"], subject=f.get("subject")))
        keys: dict[str, list] = {m: [] for m in modules}
        owners: list[torch.Tensor] = []
        dtype = DTYPES[self.meta["dtype"]]
        index = {id(f): i for i, f in enumerate(facts)}
        for batch, group in fact_batches(adapter, facts, self.meta["lm_batch_size"], where):  # make_patch's batches
            masks = adapter.key_masks(batch, modules, where)
            masks = masks[modules[0]] if isinstance(masks, dict) else masks
            with torch.no_grad(), KeyGradTrace(adapter.model, modules, masks, keep_grads=False) as t:
                adapter.answer_logits(batch)
            for m in modules:
                keys[m].append(t.keys[m].to("cpu", dtype))
            counts = masks.sum(1).tolist()
            owners.append(torch.tensor([index[id(f)] for f, c in zip(group, counts) for _ in range(c)], dtype=torch.int32))
        traced, recorded = torch.cat(owners), self.tensors["tokens/fact"]
        if not torch.equal(traced, recorded):
            raise PatchError(f"{self.name}: its facts give {len(traced)} key positions here, {len(recorded)} when it "
                             "was made (or in another order): another tokenizer than the patch's")
        for m in modules:
            self.tensors[f"tokens/{m}/keys"] = torch.cat(keys[m])

    def add_to(self, aggregator, skip: set[int] = frozenset(), chunk: int = 4096) -> None:
        """Add this patch's statistics to ``aggregator`` (leaving out the facts in ``skip``)."""
        if self.form == "sums":
            if skip:
                raise PatchError(f"{self.name}: a patch of summed statistics cannot leave facts out")
            aggregator.add_statistics({k.split("/", 1)[1]: v for k, v in self.tensors.items()})
            return
        modules = self.meta["editor"]["modules"]
        owner = self.tensors["tokens/fact"]
        keep = torch.ones_like(owner, dtype=torch.bool) if not skip else ~torch.isin(owner, torch.tensor(sorted(skip)))
        rows = keep.nonzero().flatten()
        device = aggregator.device
        for start in range(0, len(rows), chunk):
            r = rows[start:start + chunk]
            aggregator.accumulate({m: Tokens(self.tensors[f"tokens/{m}/keys"][r].to(device),
                                             d=self.tensors[f"tokens/{m}/d"][r].to(device)) for m in modules})


# ---------------------------------------------------------------- making a patch

def make_patch(editor, facts: Iterable[Fact], dtype: str = "fp16", store_keys: bool = False, progress=None) -> Patch:
    """Trace ``facts`` at the base weights (edits applied to the model are taken out meanwhile)
    and keep their contribution; nothing is edited.  Identical facts count once.  The keys are
    kept in memory either way; ``store_keys`` writes them to the patch's files too."""
    from .editor import suspended_edits, trace

    if dtype not in DTYPES:
        raise ValueError(f"patch dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    facts = list(distinct(facts))
    if not facts:
        raise ValueError("no facts for the patch")
    modules, shapes = editor.modules, editor.hypernet.shapes
    aggregator = editor.new_aggregator()
    # statistics made of K and D alone, with the same tokens in every module (not a T5's encoder and decoder)
    token_form = editor.config.aggregation in ("malmen", "joint")
    keys: dict[str, list] = {m: [] for m in modules}
    diffs: dict[str, list] = {m: [] for m in modules}
    owners: list[torch.Tensor] = []
    index = {id(f): i for i, f in enumerate(facts)}
    with suspended_edits(editor.model):
        base = model_identity(editor.model, modules)  # the base weights, not those of edits applied now
        for batch, group in editor.batches_with_facts(facts):
            traced_keys, traced_grads = trace(editor.adapter, modules, batch, editor.config.keys)
            masks = editor.adapter.key_masks(batch, modules, editor.config.keys)
            if isinstance(masks, dict):
                token_form = token_form and all(torch.equal(masks[m], masks[modules[0]]) for m in modules)
                masks = masks[modules[0]]
            counts = masks.sum(1).tolist()
            owners.append(torch.tensor([index[id(f)] for f, c in zip(group, counts) for _ in range(c)], dtype=torch.int32))
            with torch.no_grad():
                for chunk in editor.chunks(traced_keys, traced_grads):
                    aggregator.accumulate(chunk)
                    if token_form:
                        for m, t in chunk.items():
                            keys[m].append(t.keys.to("cpu", DTYPES[dtype]))
                            diffs[m].append(t.differences().to("cpu", DTYPES[dtype]))
            if progress:
                progress(len(group))
    n_tokens = sum(len(o) for o in owners)
    token_bytes = n_tokens * sum((a if store_keys else 0) + b for a, b in shapes.values()) * DTYPES[dtype].itemsize
    sums = {f"sums/{k}": v.detach().cpu() for k, v in aggregator.statistics().items()}
    sum_bytes = sum(v.numel() * v.element_size() for v in sums.values())
    if token_form and token_bytes <= sum_bytes:
        tensors = {f"tokens/{m}/keys": torch.cat(keys[m]) for m in modules}
        tensors.update({f"tokens/{m}/d": torch.cat(diffs[m]) for m in modules})
        tensors["tokens/fact"] = torch.cat(owners)
        form = "tokens"
    else:
        tensors, form = sums, "sums"
    meta = {
        "format": FORMAT, "version": VERSION, "form": form, "dtype": dtype if form == "tokens" else "fp64",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tokens": n_tokens,
        "keys_stored": store_keys or form != "tokens", "lm_batch_size": editor.config.lm_batch_size,
        "editor": {"fingerprint": editor_fingerprint(editor), "aggregation": editor.config.aggregation,
                   "keys": editor.config.keys, "modules": list(modules),
                   "shapes": {m: list(s) for m, s in shapes.items()},
                   # lambda at N0 and its exponent: the solve over all patches' keys takes lambda(N)
                   "lambdas": {m: float(lam.detach()) for m, lam in editor.lambdas().items()},
                   "lambda_exponents": {m: float(editor.hypernet.exponent(m).detach()) for m in modules},
                   "lambda_tokens_ref": editor.hypernet.config.lambda_tokens_ref},
        "base_model": base,
        "facts": [{"id": f.uid if f.uid is not None else str(i), "prompt_sha1": sha1(f.prompt),
                   "target_sha1": sha1(f.target), "prompt": f.prompt, "target": f.target,
                   **({"subject": f.subject} if f.subject is not None else {})} for i, f in enumerate(facts)],
    }
    return Patch(meta, tensors)


# ---------------------------------------------------------------- applying patches

def check_together(patches: Sequence[Patch], supersede: bool = False) -> dict[int, set[int]]:
    """Patches from one editor whose facts do not conflict; with ``supersede``, for each patch
    the facts a later patch replaces (returned as {patch index: {fact index}})."""
    if not patches:
        raise PatchError("no patches to apply")
    first = patches[0]
    for p in patches[1:]:
        if p.meta["editor"]["fingerprint"] != first.meta["editor"]["fingerprint"]:
            raise PatchError(f"{p.name} and {first.name} come from different editors; patches are summed only "
                             "when one editor made them all")
    latest: dict[str, tuple[int, int, str]] = {}  # prompt hash -> (patch, fact, target hash), newest last
    skip: dict[int, set[int]] = {}
    for i, p in enumerate(patches):
        for j, fact in enumerate(p.facts):
            earlier = latest.get(fact["prompt_sha1"])
            if earlier is not None and earlier[2] != fact["target_sha1"]:
                older = patches[earlier[0]]
                if not supersede:
                    raise PatchError(f"{p.name}: fact {fact['id']} ({fact['prompt']!r} -> {fact['target']!r}) conflicts "
                                     f"with fact {older.facts[earlier[1]]['id']} of {older.name} (-> "
                                     f"{older.facts[earlier[1]]['target']!r}); pass supersede to let the newer one win")
                if older.form != "tokens":
                    raise PatchError(f"{older.name} holds summed statistics: its fact {older.facts[earlier[1]]['id']} "
                                     f"cannot be superseded by {p.name}")
                skip.setdefault(earlier[0], set()).add(earlier[1])
            elif earlier is not None and earlier[0] != i:  # the same fact again: it counts once
                if p.form == "tokens":
                    skip.setdefault(i, set()).add(j)
                    continue
                older = patches[earlier[0]]
                if older.form != "tokens":
                    raise PatchError(f"{p.name} and {older.name} both hold fact {fact['prompt']!r} as summed "
                                     "statistics: it would count twice")
                skip.setdefault(earlier[0], set()).add(earlier[1])
            latest[fact["prompt_sha1"]] = (i, j, fact["target_sha1"])
    return skip


class PatchHandle:
    """The patches applied to a model: their summed statistics and the edit they make.

    ``add`` and ``remove`` change the set with one solve each (``add`` sums in the new patch only;
    ``remove`` sums the remaining patches again, so the model equals applying them alone);
    ``revert`` restores the base weights bit for bit.  Patches that do not store their keys have
    them traced once, at the base weights, with ``tokenizer``."""

    def __init__(self, model: nn.Module, patches: Sequence[Patch], supersede: bool = False, tokenizer=None):
        self.model, self.supersede, self.tokenizer = model, supersede, tokenizer
        self._adapter = None
        self.patches: list[Patch] = []
        self.edit = None
        self.aggregator = None
        self._rebuild(list(patches))

    @property
    def shifts(self) -> dict[str, torch.Tensor]:
        return self.edit.shifts if self.edit is not None else {}

    def _check_base(self, patch: Patch) -> None:
        modules = patch.meta["editor"]["modules"]
        recorded = patch.meta["base_model"].get("weight_sample")
        if self.edit is not None:  # the weights now carry the edit: compare against those it replaced
            current = {m: [float(x) for x in _sample(self.edit.originals[m])] for m in modules}
        else:
            current = weight_sample(self.model, modules)
        if recorded is not None and not same_weights(recorded, current):
            raise PatchError(f"{patch.name} was made for another base model ({patch.meta['base_model'].get('name')!r})")

    def _with_keys(self, patch: Patch) -> None:
        from .adapters import adapter_for
        from .editor import suspended_edits

        if patch.has_keys:
            return
        if self.tokenizer is None:
            raise PatchError(f"{patch.name} does not store its keys: apply it with its base model's tokenizer, "
                             "which traces them again")
        self._adapter = self._adapter or adapter_for(self.model, self.tokenizer)
        with suspended_edits(self.model):  # keys at the base weights
            patch.trace_keys(self._adapter)

    def _fresh_aggregator(self, patch: Patch):
        editor = patch.meta["editor"]
        shapes = {m: tuple(s) for m, s in editor["shapes"].items()}
        device = next(self.model.parameters()).device
        return AGGREGATIONS[editor["aggregation"]](shapes, device=device)

    def _solve_and_apply(self) -> None:
        from .editor import EditHandle

        editor = self.patches[0].meta["editor"]
        exponents = editor.get("lambda_exponents", {})  # patches written before the exponent: alpha = 0
        counts = self.aggregator.counts()
        with torch.no_grad():
            lams = {m: regulariser_at(math.log(v), exponents.get(m, 0.0), counts[m], editor.get("lambda_tokens_ref", 1.0))
                    for m, v in editor["lambdas"].items()}
            solution = self.aggregator.solve(lams)
            told = solver_report(self.aggregator, solution) if all(p.has_norms for p in self.patches) else {}
        if self.edit is not None:
            self.edit.revert()
        self.edit = EditHandle(self.model, solution.shifts, told)

    @property
    def report(self) -> dict:
        """The current edit's report (``EditHandle.report``: the solve's fit and room)."""
        return self.edit.report if self.edit is not None else {}

    def _rebuild(self, patches: list[Patch]) -> None:
        if not patches:
            self.revert()
            self.patches = []
            return
        for p in patches:
            self._check_base(p)
        skip = check_together(patches, self.supersede)
        for p in patches:
            self._with_keys(p)
        aggregator = self._fresh_aggregator(patches[0])
        for i, p in enumerate(patches):
            p.add_to(aggregator, skip.get(i, set()))
        self.patches, self.aggregator = patches, aggregator
        self._solve_and_apply()

    def add(self, patch: Patch) -> "PatchHandle":
        """Apply one more patch: its statistics are added to the sums, then one solve."""
        self._check_base(patch)
        skip = check_together(self.patches + [patch], self.supersede)
        if any(i < len(self.patches) for i in skip):  # an older fact is superseded: sum everything again
            self._rebuild(self.patches + [patch])
            return self
        self._with_keys(patch)
        patch.add_to(self.aggregator, skip.get(len(self.patches), set()))
        self.patches.append(patch)
        self._solve_and_apply()
        return self

    def remove(self, patch: Patch | str) -> "PatchHandle":
        """Take a patch (or the patch of that name) out: the model the others alone make."""
        if isinstance(patch, str):
            kept = [p for p in self.patches if p.name != patch]
        else:
            kept = [p for p in self.patches if p is not patch]
        if len(kept) == len(self.patches):
            raise PatchError(f"{patch if isinstance(patch, str) else patch.name} is not applied")
        self._rebuild(kept)
        return self

    def revert(self) -> None:
        """The base weights, bit for bit."""
        if self.edit is not None:
            self.edit.revert()
            self.edit = None


def _sample(weight: torch.Tensor, per_module: int = 32) -> torch.Tensor:
    flat = weight.detach().flatten()
    idx = torch.linspace(0, flat.numel() - 1, per_module).long().to(flat.device)
    return flat[idx].float().cpu()


def apply_patches(model: nn.Module, patches: Sequence[Patch], supersede: bool = False,
                  tokenizer=None) -> PatchHandle:
    """One solve over the sum of ``patches``, applied to ``model`` (their base model); the
    handle reverts exactly, and adds or removes patches with one solve each.  ``tokenizer`` (the
    base model's) is needed for patches that do not store their keys."""
    return PatchHandle(model, patches, supersede, tokenizer)
