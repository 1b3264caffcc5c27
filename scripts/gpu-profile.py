"""Where the time of an edit and of a meta-training step goes on a GPU (issue 16; docs/BENCHMARKS.md).

Phases timed with synchronisation, the source lines that synchronise the host with the GPU
(torch.cuda.set_sync_debug_mode) and torch.profiler tables, on a random model of a real shape:

    SHAPE=gptj-6b N=1024 TOKENIZER=DIR PYTHONPATH=src python scripts/gpu-profile.py > prof.txt

DEV=cpu SHAPE=smollm2-135m N=64 RANK=64 rehearses it on a CPU (no sync sites or profile there)."""
import collections, os, sys, time, traceback, warnings
import torch
from transformers import AutoTokenizer
from malmen.bench.shapes import random_model
from malmen.bench.synthetic import synthetic_facts
from malmen.editor import EditorConfig, MalmenEditor
from malmen.hypernet import HyperConfig
from malmen.timing import synchronize
from malmen.train import TrainConfig, Trainer

shape, dev = os.environ.get("SHAPE", "gptj-6b"), os.environ.get("DEV", "cuda")
N = int(os.environ.get("N", "1024"))
dtype = torch.bfloat16
tok = AutoTokenizer.from_pretrained(os.environ.get("TOKENIZER", ".gpu-tok"))
model = random_model(shape, dtype, dev)
ed = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=int(os.environ.get("RANK", "1920"))), lm_batch_size=64))
facts, train = list(synthetic_facts(N, seed=1)), list(synthetic_facts(N * 3, seed=2))
times = collections.defaultdict(float)

def timed_method(cls, name):
    f = getattr(cls, name)
    def wrapper(*a, **k):
        synchronize(dev); t = time.perf_counter()
        out = f(*a, **k)
        synchronize(dev); times[name] += time.perf_counter() - t
        return out
    setattr(cls, name, wrapper)

for n in ("trace_edits", "shift_gradients", "backward_through_solve", "meta_gradients"):
    timed_method(Trainer, n)
for n in ("solve", "accumulate", "batches"):
    timed_method(MalmenEditor, n)

def sync_sites(fn):
    if dev != "cuda":
        fn(); return collections.Counter()
    sites = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            sites[f"{os.path.basename(w.filename)}:{w.lineno}"] += 1
    return sites

ed.shifts(facts[:64])
for label, fn in (("edit", lambda: ed.shifts(facts)),):
    times.clear(); synchronize(dev); t = time.perf_counter(); fn(); synchronize(dev)
    print(f"{label} {N} facts: {time.perf_counter() - t:.3f} s; phases", {k: round(v, 3) for k, v in times.items()})
    print("  sync sites:", sync_sites(fn).most_common(12))
trainer = Trainer(ed, train, train[:1] * N, TrainConfig(n_edits=N, calibrate_eta=False), "/nonexistent")
trainer.meta_step(trainer.step_facts(0), 0)
times.clear(); synchronize(dev); t = time.perf_counter()
trainer.meta_step(trainer.step_facts(1), 1); synchronize(dev)
print(f"train step n={N}: {time.perf_counter() - t:.3f} s; phases", {k: round(v, 3) for k, v in times.items()})
print("  sync sites:", sync_sites(lambda: trainer.meta_step(trainer.step_facts(2), 2)).most_common(15))
if dev == "cuda":
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.meta_step(trainer.step_facts(3), 3); synchronize(dev)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ed.shifts(facts); synchronize(dev)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
