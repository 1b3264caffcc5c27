"""Second moments of the keys of linear layers over a text corpus: MEMIT's C = E[k kᵀ].

Locate-then-edit methods (memit.py) protect what a layer already does by weighing an update
against the keys the layer usually sees.  Those keys come from ordinary text, read once in a
streaming pass (fp64 sums, memory flat in the corpus), and are cached on disk with a manifest
naming the model, the layers and the corpus, so that every later edit reuses them.

The corpus is text the model samples itself (ancestral sampling at temperature 1 from its
BOS token, a fixed seed): it exists offline for every model, carries no licence of its own,
and follows the distribution of inputs the model was trained to expect, which is what the
statistics stand for.  MEMIT used 100,000 Wikipedia samples, which this machine does not have.

    stats = key_moments(model, tokenizer, modules, Corpus(texts=512, length=128), cache="~/.cache/malmen")
    stats.mean("model.layers.4.mlp.down_proj")      # (in x in), E[k kᵀ] over every sampled token
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from . import io
from .formats import EDITOR_PRIOR
from .models import model_identity
from .timing import timed
from .tracing import KeyGradTrace

FORMAT = "malmen-keystats"
VERSION = 1


@dataclass(frozen=True)
class Corpus:
    """Text sampled from the model itself: ``texts`` sequences of ``length`` tokens."""

    texts: int = 512
    length: int = 128
    seed: int = 0
    batch_size: int = 128  # sampling reads every weight once per token step: large batches amortise it
    kind: str = "model-samples"


class SecondMoments:
    """Streaming sums of k kᵀ and their count, per module: each batch's product in fp32 (fp64
    matrix products are ten times slower on CPUs), summed over batches in fp64."""

    def __init__(self, sums: dict[str, torch.Tensor] | None = None, count: int = 0):
        self.sums, self.count = dict(sums or {}), count

    def add(self, keys: dict[str, torch.Tensor]) -> None:
        """Add the keys (rows) of one batch; every module sees the same number of rows."""
        counts = {k.shape[0] for k in keys.values()}
        if len(counts) != 1:
            raise ValueError(f"modules saw different numbers of keys: {counts}")
        for name, k in keys.items():
            k = k.float()
            product = (k.T @ k).double()
            self.sums[name] = self.sums[name] + product if name in self.sums else product
        self.count += counts.pop()

    def mean(self, name: str) -> torch.Tensor:
        """E[k kᵀ] of module ``name`` (fp64)."""
        return self.sums[name] / self.count


def sample_corpus(model: nn.Module, tokenizer, corpus: Corpus) -> Iterable[torch.Tensor]:
    """Batches of token ids the model samples from its BOS token (``corpus.seed`` fixes them)."""
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(corpus.seed)
    try:
        done = 0
        while done < corpus.texts:
            n = min(corpus.batch_size, corpus.texts - done)
            ids = torch.full((n, 1), start, dtype=torch.long, device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=corpus.length - 1,
                                     min_new_tokens=corpus.length - 1, pad_token_id=start)
            done += n
            yield out
    finally:
        torch.random.set_rng_state(generator_state)


def accumulate(model: nn.Module, modules: Sequence[str], batches: Iterable[torch.Tensor]) -> SecondMoments:
    """The keys of ``modules`` at every position of every batch of token ids, summed."""
    moments = SecondMoments()
    for ids in batches:
        with torch.no_grad(), KeyGradTrace(model, modules, None, keep_grads=False) as t:
            model(input_ids=ids, use_cache=False)
        moments.add(t.keys)
    return moments


def answer_moments(adapter, modules: Sequence[str], prompts: Sequence[str], answers: Sequence[str],
                   batch_size: int = 32) -> SecondMoments:
    """The keys of ``modules`` at the answer positions of teacher-forced prompt/answer pairs, summed:
    the positions where an edit's locality is measured, when the pairs are a data set's locality
    prompts (the inputs edits must leave alone).  ``adapter``: how the model is fed (adapters/)."""
    moments = SecondMoments()
    for i in range(0, len(prompts), batch_size):
        moments.add(answer_keys(adapter, modules, prompts[i:i + batch_size], answers[i:i + batch_size]))
    return moments


def answer_keys(adapter, modules: Sequence[str], prompts: Sequence[str],
                answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """The keys of ``modules`` at the answer positions of one batch of teacher-forced pairs, in row order."""
    batch = adapter.batch(prompts, answers)
    with torch.no_grad(), KeyGradTrace(adapter.model, modules, adapter.key_rows(batch, modules), keep_grads=False) as t:
        adapter.answer_logits(batch)
    return t.keys


def rephrase_moments(adapter, modules: Sequence[str], prompts: Sequence[str], rephrases: Sequence[str],
                     answers: Sequence[str], batch_size: int = 32) -> SecondMoments:
    """E[(k' - k)(k' - k)ᵀ] of ``modules``: how the keys at the answer positions move when a question
    is asked in other words, k read with the prompt and k' with its rephrase, answer token for answer
    token (the same answer, so the same positions).  A regulariser heavy in these directions keeps
    the shift off them, so that a rephrase receives what its prompt does."""
    moves = SecondMoments()
    for i in range(0, len(prompts), batch_size):
        s = slice(i, i + batch_size)
        k, k2 = (answer_keys(adapter, modules, asked[s], answers[s]) for asked in (prompts, rephrases))
        if any(k[m].shape != k2[m].shape for m in modules):
            raise ValueError("a prompt and its rephrase gave different numbers of answer positions")
        moves.add({m: k2[m].float() - k[m].float() for m in modules})
    return moves


def blended(second_moment: torch.Tensor, moves: torch.Tensor, share: float) -> torch.Tensor:
    """A regulariser's shape before ``key_prior``'s mix with the identity: ``(1 - share) C' + share W'``,
    C' and W' the keys' second moment and their rephrase moves (``rephrase_moments``) each scaled to
    mean eigenvalue 1, so the blend keeps the identity's trace (share 0: C' itself)."""
    return (1.0 - share) * key_prior(second_moment) + share * key_prior(moves)


def corpus_identity(model: nn.Module, corpus: Corpus) -> dict:
    """What the sampled texts depend on: the model (family, sizes, a sample of its embeddings) and the corpus."""
    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    identity = model_identity(model, [embedding])
    return {"format": FORMAT, "version": VERSION, "model": identity, "corpus": asdict(corpus)}


def key_moments(model: nn.Module, tokenizer, modules: Sequence[str], corpus: Corpus,
                cache: str | Path | None = None, log: Callable[[str], None] | None = None) -> SecondMoments:
    """The second moments of ``modules``' keys over ``corpus``.

    With ``cache``, one folder per (model, corpus) keeps the sampled token ids and each module's
    sums, with a manifest; a module's sums are reused while its weights match the recorded sample,
    and missing modules cost one forward pass over the kept texts, not a new sampling.
    ``.seconds`` on the result is the time spent now (0 when everything was cached)."""
    device = next(model.parameters()).device
    identity = corpus_identity(model, corpus)
    folder, manifest = None, {**identity, "modules": {}}
    if cache is not None:
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(cache).expanduser() / "keystats" / digest
        if (folder / "manifest.json").exists():
            recorded = io.read_json(folder / "manifest.json")
            if all(recorded.get(k) == v for k, v in identity.items()):
                manifest = recorded
    samples = {m: model_identity(model, [m])["weight_sample"][m] for m in modules}
    missing = [m for m in modules if manifest["modules"].get(m, {}).get("weight_sample") != samples[m]]
    moments = SecondMoments()
    with timed(device) as took:
        if missing:
            if "tokens" in manifest and (folder / "corpus.safetensors").exists():  # a forward pass is all it takes
                ids = io.load_tensors(folder / "corpus.safetensors")["ids"].to(device).long()
            else:
                if log:
                    log(f"key statistics: sampling {corpus.texts} texts of {corpus.length} tokens from the model")
                ids = torch.cat(list(sample_corpus(model, tokenizer, corpus)))
            moments = accumulate(model, missing, ids.split(32))
        for m in modules:
            if m not in missing:
                moments.sums[m] = io.load_tensors(folder / f"{m}.safetensors")["sums"].to(device)
                moments.count = manifest["tokens"]
    moments.seconds = took.seconds if missing else 0.0
    if folder is not None and missing:
        with io.atomic_dir(folder) as tmp:
            for m in manifest["modules"]:
                if m not in missing:
                    (tmp / f"{m}.safetensors").write_bytes((folder / f"{m}.safetensors").read_bytes())
            io.save_tensors(tmp / "corpus.safetensors", {"ids": ids.to("cpu", torch.int32).contiguous()})
            for m in missing:
                io.save_tensors(tmp / f"{m}.safetensors", {"sums": moments.sums[m].cpu().contiguous()})
                manifest["modules"][m] = {"weight_sample": samples[m], "seconds": took.seconds}
            manifest["tokens"] = moments.count
            io.write_json(tmp / "manifest.json", manifest)
    return moments


def key_prior(second_moment: torch.Tensor, mix: float = 1.0) -> torch.Tensor:
    """A regulariser's shape from the keys' second moment C: ``(1 - mix) I + mix C / (tr C / a)``.

    Scaled to mean eigenvalue 1, the matrix has the identity's trace, so a regulariser lambda
    learned with the identity (MALMEN's lambda I) keeps its overall strength; only its direction
    changes, heavier where ordinary text's keys point and lighter where they seldom do."""
    c = second_moment.double()
    a = c.shape[0]
    scaled = c * (a / c.diagonal().sum().clamp_min(1e-30))
    eye = torch.eye(a, dtype=c.dtype, device=c.device)
    return (1.0 - mix) * eye + mix * scaled


def compressed_prior(prior: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """A regulariser shape P kept in ``rank`` eigenpairs and a diagonal: its top eigenvectors
    (``vectors``, a x rank, float16) and eigenvalues (``values``), and ``diagonal``, the diagonal of
    what they leave out; (rank + 1) * a numbers instead of a * a, so that an editor can carry the
    statistics it edits with.  ``expanded_prior`` restores P exactly on the kept eigenvectors and on
    the diagonal (so with its trace); the diagonal keeps each input's own share of the rest, which
    the mean of the left-out eigenvalues would spread evenly (docs/RESULTS.md, row 35)."""
    values, vectors = torch.linalg.eigh(prior.double())
    rank = min(rank, values.shape[0])
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank].to(torch.float16).contiguous()
    low = low_rank(vectors, values)  # from the stored float16 vectors, as expanded_prior will
    return {"vectors": vectors, "values": values.float(),
            "diagonal": (prior.double() - low).diagonal().clamp_min(0).float().contiguous()}


def low_rank(vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """V diag(values) Vᵀ in float64, V the stored vectors made orthonormal again after their rounding."""
    v = torch.linalg.qr(vectors.double())[0]
    return (v * values.double()) @ v.T


def expanded_prior(vectors: torch.Tensor, values: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """P from ``compressed_prior``'s parts: V diag(values) Vᵀ + diag(diagonal), in float64."""
    return low_rank(vectors, values) + torch.diag(diagonal.double())


def flat_prior(kept: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A kept prior as one safetensors dict: '<module>.<part>' (EDITOR_PRIOR)."""
    return {f"{m}.{part}": t.cpu().contiguous() for m, parts in kept.items() for part, t in parts.items()}


def nested_prior(tensors: dict[str, torch.Tensor], modules: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``flat_prior`` read back, every module's parts checked to be there."""
    parts = ("vectors", "values", "diagonal")
    missing = [f"{m}.{p}" for m in modules for p in parts if f"{m}.{p}" not in tensors]
    if missing:
        raise ValueError(f"{EDITOR_PRIOR} lacks {', '.join(missing[:3])}")
    return {m: {p: tensors[f"{m}.{p}"] for p in parts} for m in modules}
