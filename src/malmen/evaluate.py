"""ES / GS / LS for a batch of facts edited at once, with the unedited model's figures beside.

Per fact, averaged over facts (DESIGN.md section 5):
  ES, GS   teacher-forced token accuracy on the edit prompt / headline rephrase (the paper's);
  GS_chat  GS with the rephrase asked as a user's turn of the tokenizer's chat template (instruct
           models; only when the tokenizer has a template);
  *_exact  all answer tokens right;  *_gen  greedy continuation starts with the target;
  LS       fraction of locality answer tokens whose argmax is unchanged by the edit (headline);
  LS_data  token accuracy against the dataset's locality answer (the paper's variant);
  PPL      perplexity of ordinary text given with ``texts`` (perplexity.py; lower is better), the
           edited figure the mean over groups.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import resource
from typing import Callable, Sequence

import torch

from .editor import MalmenEditor, micro_batches
from .facts import Fact
from .adapters import Adapter
from .perplexity import perplexity
from .replay import TrunkCache
from .timing import timed

METRICS = ("ES", "GS", "LS", "GS_chat", "ES_exact", "GS_exact", "ES_gen", "GS_gen", "LS_data", "PPL")


@torch.no_grad()
def predictions(adapter: Adapter, prompts: Sequence[str], answers: Sequence[str],
                batch_size: int = 32, trunk: TrunkCache | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair: (argmax predictions, target ids) at the answer positions, teacher-forced.

    With ``trunk``, the blocks below the edited layers are recorded (unedited pass) or replayed.
    """
    out = []
    for group in micro_batches(list(zip(prompts, answers)), batch_size):
        batch = adapter.batch([p for p, _ in group], [a for _, a in group])
        with trunk.step() if trunk is not None else contextlib.nullcontext():
            pred = adapter.answer_logits(batch).argmax(-1).cpu()
        targets = batch.targets[batch.mask].cpu()
        counts = batch.mask.sum(1).tolist()
        out.extend(zip(pred.split(counts), targets.split(counts)))
    return out


def greedy_starts_with(adapter: Adapter, prompts: Sequence[str], answers: Sequence[str],
                       batch_size: int = 32) -> list[bool]:
    """Whether the greedy continuation of each prompt starts with its answer."""
    results = []
    for group in micro_batches(list(zip(prompts, answers)), batch_size):
        # one token more than the longest answer needs, so a longer tokenisation still fits
        n_new = max(adapter.answer_length(p, a) for p, a in group) + 1
        texts = adapter.continuations([p for p, _ in group], n_new)
        results.extend(text.strip().startswith(a.strip()) for (_, a), text in zip(group, texts))
    return results


def snapshot(adapter: Adapter, facts: Sequence[Fact], generate: bool,
             reference: list | None = None, batch_size: int = 32,
             trunk: TrunkCache | None = None) -> tuple[dict, list]:
    """Per-fact metric lists for the model as it is now; also returns the locality argmaxes."""
    targets = [f.target for f in facts]
    es = predictions(adapter, [f.prompt for f in facts], targets, batch_size, trunk)
    gs_facts = [f for f in facts if f.rephrases]
    gs = predictions(adapter, [f.rephrases[0] for f in gs_facts], [f.target for f in gs_facts], batch_size, trunk)
    loc_facts = [f for f in facts if f.has_locality]
    loc = predictions(adapter, [f.locality_prompt for f in loc_facts], [f.locality_answer for f in loc_facts], batch_size, trunk)
    m = {
        "ES": [float((p == t).float().mean()) for p, t in es],
        "ES_exact": [float((p == t).all()) for p, t in es],
        "GS": [float((p == t).float().mean()) for p, t in gs],
        "GS_exact": [float((p == t).all()) for p, t in gs],
        "LS_data": [float((p == t).float().mean()) for p, t in loc],
    }
    chat = [adapter.chat_prompt(f.rephrases[0]) for f in gs_facts]
    if gs_facts and all(c is not None for c in chat):
        gs_chat = predictions(adapter, chat, [f.target for f in gs_facts], batch_size, trunk)
        m["GS_chat"] = [float((p == t).float().mean()) for p, t in gs_chat]
    loc_pred = [p for p, _ in loc]
    ref = reference if reference is not None else loc_pred
    m["LS"] = [float((p == r).float().mean()) for p, r in zip(loc_pred, ref)]
    if generate:
        m["ES_gen"] = [float(x) for x in greedy_starts_with(adapter, [f.prompt for f in facts], targets, batch_size)]
        m["GS_gen"] = [float(x) for x in greedy_starts_with(
            adapter, [f.rephrases[0] for f in gs_facts], [f.target for f in gs_facts], batch_size)]
    return m, loc_pred


def fingerprint(facts: Sequence[Fact]) -> str:
    """A digest of everything the metrics read from ``facts`` (which figures a cache may reuse)."""
    digest = hashlib.sha256()
    for f in facts:
        digest.update(repr((f.prompt, f.target, f.rephrases[:1], f.locality_prompt, f.locality_answer)).encode())
    return digest.hexdigest()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def evaluate(editor: MalmenEditor, facts: Sequence[Fact], n_edits: int, generate: bool = True,
             progress: Callable[[str], None] | None = None, unedited: dict | None = None,
             texts: Sequence[torch.Tensor] | None = None) -> dict:
    """Edit ``facts`` in consecutive groups of ``n_edits`` at once; average metrics over all facts.

    Every group is edited into the unedited model and reverted afterwards.  ``unedited``: a dict
    kept across calls (several editors of one model): the unedited figures and the recorded trunk
    of each group are computed once and reused, keyed by the group's facts.  ``texts``: token id
    windows of ordinary text (perplexity.windows) whose perplexity is measured unedited and after
    each group's edit (``PPL``).
    """
    facts = list(facts)
    if not facts:
        raise ValueError("no facts to evaluate")
    groups = [facts[i:i + n_edits] for i in range(0, len(facts), n_edits)]
    if len(groups) > 1 and len(groups[-1]) < n_edits:
        groups = groups[:-1]  # every reported edit has exactly n_edits facts
    before: dict[str, list] = {}
    after: dict[str, list] = {}
    edit_seconds, reports = [], []
    bs = editor.config.lm_batch_size
    if texts:  # the unedited perplexity once per text, where a cache is shared
        cache, key = unedited if unedited is not None else {}, ("PPL", tuple(tuple(t.tolist()) for t in texts))
        if key not in cache:
            cache[key] = perplexity(editor.adapter, list(texts))
        before["PPL"] = [cache[key]]
    for i, group in enumerate(groups):
        if progress:
            progress(f"group {i + 1}/{len(groups)}: unedited")
        # the blocks below the edited layers are run once, before the edit, and replayed after it
        key = (fingerprint(group), bs, tuple(editor.modules), generate)
        if unedited is None or key not in unedited:
            trunk = editor.adapter.trunk(editor.modules)
            m0, reference = snapshot(editor.adapter, group, generate, None, bs, trunk)
            if unedited is not None:
                unedited[key] = (m0, reference, trunk)
        else:
            m0, reference, trunk = unedited[key]
        trunk.rewind()
        with timed(editor.adapter.device) as took:
            handle = editor.edit(group)
        edit_seconds.append(took.seconds)
        reports.append(handle.report)
        try:
            if progress:
                progress(f"group {i + 1}/{len(groups)}: edited {len(group)} facts in {edit_seconds[-1]:.1f}s")
            m1, _ = snapshot(editor.adapter, group, generate, reference, bs, trunk)
            if texts:
                after.setdefault("PPL", []).append(perplexity(editor.adapter, list(texts)))
        finally:
            handle.revert()
        for key in m0:
            before.setdefault(key, []).extend(m0[key])
            after.setdefault(key, []).extend(m1[key])

    def mean(values: list) -> float:
        return sum(values) / len(values) if values else math.nan

    result = {"n_edits": len(groups[0]), "n_facts": sum(map(len, groups)), "n_groups": len(groups)}
    result.update({k: mean(v) for k, v in after.items()})
    result["before"] = {k: mean(v) for k, v in before.items()}
    result["edit_seconds"] = mean(edit_seconds)
    result.update(mean_reports(reports, mean))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def mean_reports(reports: Sequence[dict], mean: Callable[[list], float]) -> dict:
    """The groups' edit reports (``EditHandle.report``) averaged entry by entry: a number, or a
    dict of numbers (``fit``: one R^2 per module) averaged key by key."""
    merged: dict = {}
    for report in reports:
        for key, value in report.items():
            if isinstance(value, dict):
                for name, number in value.items():
                    merged.setdefault(key, {}).setdefault(name, []).append(number)
            else:
                merged.setdefault(key, []).append(value)
    return {key: {name: mean(v) for name, v in value.items()} if isinstance(value, dict) else mean(value)
            for key, value in merged.items()}


def report_lines(report: dict) -> list[str]:
    """An edit's report (solver.report: ``fit`` and ``room`` per module), one line each, for people."""
    words = {"fit": "the solve wrote {mean:.1%} of the value change the hyper-network asked for (R^2 per module: {each})",
             "room": "a fact's own ask is written {mean:.1%} on average (mean leverage per module: {each}; "
                     "past the key size it falls as 1 / tokens)"}
    lines = []
    for key, template in words.items():
        values = report.get(key)
        if values:
            each = ", ".join(f"{name} {value:.3f}" for name, value in values.items())
            lines.append(f"{key}: " + template.format(mean=sum(values.values()) / len(values), each=each))
    return lines


def table(result: dict) -> str:
    """A small Markdown table: metric, unedited, edited."""
    lines = [f"n = {result['n_edits']} facts edited at once, {result['n_groups']} group(s), {result['n_facts']} facts",
             "| metric | unedited | edited |", "| --- | ---: | ---: |"]
    for key in METRICS:
        if key in result:
            lines.append(f"| {key} | {result['before'][key]:.3f} | {result[key]:.3f} |")
    lines.append(f"edit time {result['edit_seconds']:.2f} s per group, peak RSS {result['peak_rss_mb']:.0f} MB")
    lines += report_lines(result)
    return "\n".join(lines)
