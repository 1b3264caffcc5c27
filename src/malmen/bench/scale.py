"""``malmen bench scale``: peak memory and wall time of one edit of n facts, n up to millions.

Each n runs in a fresh process (peak resident memory is per process), editing n deterministic
synthetic facts streamed from a generator: nothing proportional to n is ever held, because the
solver keeps only the sums KᵀK and KᵀD.  ``--model tiny`` is a 4-block Llama built in-process
(random weights, the SmolLM2 tokenizer) for the largest n.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable, Sequence

import torch


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tiny_model():
    """A small random Llama with the SmolLM2 tokenizer: the LM cost of a fact is tiny, so what
    remains is the editor's own per-fact work and memory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ..models import prepare, resolve

    where, gguf = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.name_or_path = "tiny"
    return prepare(model), tok


def point(model_name: str, editor_name: str | None, n: int, lm_batch_size: int | None) -> dict:
    """Edit n synthetic facts at once in this process; time and memory."""
    from ..editor import EditorConfig, MalmenEditor
    from ..evaluate import peak_rss_mb
    from ..models import load_model
    from .synthetic import synthetic_facts

    model, tok = tiny_model() if model_name == "tiny" else load_model(model_name)
    # time and memory do not depend on what the hyper-network learned: an untrained one will do
    editor = MalmenEditor.from_pretrained(editor_name, model, tok) if editor_name else MalmenEditor(model, tok, EditorConfig())
    if lm_batch_size:
        editor.config.lm_batch_size = lm_batch_size
    editor.shifts(synthetic_facts(editor.config.lm_batch_size, seed=1))  # warm-up
    rss_before = current_rss_mb()
    start = time.perf_counter()
    shifts = editor.shifts(synthetic_facts(n))
    seconds = time.perf_counter() - start
    assert all(torch.isfinite(s).all() for s in shifts.values())
    return {"n": n, "seconds": seconds, "facts_per_s": n / seconds, "peak_rss_mb": peak_rss_mb(),
            "rss_before_edit_mb": rss_before, "rss_after_edit_mb": current_rss_mb()}


def run_scale(model_name: str, editor_name: str | None, ns: Sequence[int], lm_batch_size: int | None = None,
              log: Callable[[str], None] = print) -> dict:
    points = []
    for n in ns:
        cmd = [sys.executable, "-m", "malmen.bench.scale", model_name, editor_name or "", str(n), str(lm_batch_size or 0)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"scale point n={n} failed: {proc.stderr.strip().splitlines()[-1:]}")
        points.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        p = points[-1]
        log(f"n={n}: {p['seconds']:.1f} s ({p['facts_per_s']:.0f} facts/s), peak RSS {p['peak_rss_mb']:.0f} MB")
    first, last = points[0], points[-1]
    return {"model": model_name, "editor": editor_name, "points": points,
            "rss_ratio": last["peak_rss_mb"] / first["peak_rss_mb"],
            "seconds_per_fact": {str(p["n"]): p["seconds"] / p["n"] for p in points}}


if __name__ == "__main__":  # one point, in its own process: model editor n lm_batch_size
    name, editor, n, bs = sys.argv[1:5]
    print(json.dumps(point(name, editor or None, int(n), int(bs) or None)))
