"""Fault matrix of docs/RELIABILITY.md: interrupted runs, atomic writes, duplicate and conflicting
facts, numerics.  Malformed-file rows live in test_datasets.py and test_cli.py."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import tiny
from malmen.datasets import load_facts
from malmen.editor import EditorConfig, MalmenEditor
from malmen.facts import FactError
from malmen.hypernet import HyperConfig


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    tiny.write_model(root / "model")
    tiny.write_facts(root / "train.jsonl", tiny.facts(64, seed=5))
    return root


def train_cmd(root, out, steps):
    return [sys.executable, "-m", "malmen.cli", "train", "--model", str(root / "model"), "--data", str(root / "train.jsonl"),
            "--no-split", "--val-n", "8", "--out", str(out), "--rank", "8", "--n-edits", "8", "--steps", str(steps),
            "--val-every", "2", "--lm-batch-size", "4"]


def test_sigkill_during_training_then_resume_is_bitwise_identical(tiny_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, cut = tiny_dir / "full", tiny_dir / "cut"
    subprocess.run(train_cmd(tiny_dir, full, 10), check=True, capture_output=True, env=env, timeout=600)
    proc = subprocess.Popen(train_cmd(tiny_dir, cut, 10), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    log = cut / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = len(log.read_text().splitlines())
    assert steps_done < 10, "the run finished before it could be killed"
    subprocess.run(train_cmd(tiny_dir, cut, 10), check=True, capture_output=True, env=env, timeout=600)
    from safetensors.torch import load_file
    a, b = load_file(full / "last" / "editor.safetensors"), load_file(cut / "last" / "editor.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == list(range(1, 11))


def test_sigkill_while_saving_leaves_old_or_nothing(tmp_path):
    target = tmp_path / "edited"
    code = textwrap.dedent(f"""
        import os, signal
        from malmen.io import atomic_dir
        with atomic_dir({str(target)!r}) as tmp:
            (tmp / "config.json").write_text("{{}}")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -signal.SIGKILL
    assert not target.exists()
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    subprocess.run([sys.executable, "-c", code])
    assert (target / "model.safetensors").read_text() == "old" and not (target / "config.json").exists()


def test_conflicting_facts_are_refused_duplicates_allowed(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"prompt": "a b", "target": "x"}\n' * 3 + '{"prompt": "a b", "target": "y"}\n')
    with pytest.raises(FactError, match="record 4: same prompt as record 1 with a different target"):
        list(load_facts(path, check_conflicts=True))
    assert len(list(load_facts(path))) == 4  # without the check (training data may repeat prompts)


def test_zero_gradients_give_a_zero_finite_shift():
    from malmen.solver import NormalEquation, Tokens

    agg = NormalEquation(4, 3)
    agg.accumulate(Tokens(torch.randn(5, 4), torch.randn(5, 4), torch.zeros(5, 3), torch.tensor(1.0)))
    assert torch.equal(agg.solve(1.0).shift, torch.zeros(4, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_in_shifts_for_fp32_and_bf16(dtype):
    model, tok = tiny.llama(dtype=dtype), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0)))
    shifts = editor.shifts(tiny.facts(3))  # n (tokens) far below the key size
    assert all(torch.isfinite(s).all() for s in shifts.values())


def test_torch_load_is_never_called_on_user_files():
    src = Path(__file__).resolve().parents[1] / "src" / "malmen"
    import re

    unsafe = re.compile(r"torch\.load\(|pickle\.loads?\(|^\s*(import|from) (pickle|dill|joblib)", re.M)
    offenders = [p for p in src.rglob("*.py") if unsafe.search(p.read_text())]
    assert offenders == []


def test_prompt_longer_than_context_is_truncated_from_the_left():
    from malmen.adapters import CausalLMAdapter

    adapter = CausalLMAdapter(tiny.llama(), tiny.tokenizer())  # context: 64 positions
    batch = adapter.batch(["alpha " * 100 + "what is the capital of w1"], ["paris rome"])
    assert batch.input_ids.shape[1] == 64 and int(batch.mask.sum()) == 2
    assert batch.input_ids[0, -2:].tolist() == adapter.tokenizer("paris rome", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="longer than the model's context"):
        adapter.batch(["what"], ["alpha " * 80])


def test_atomic_dir_with_a_marker_replaces_only_what_it_wrote(tmp_path):
    from malmen.io import atomic_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no editor.json"):
        with atomic_dir(mine, marker="editor.json") as tmp:
            (tmp / "editor.json").write_text("{}")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    for target in (tmp_path / "new", tmp_path / "empty", mine):  # absent, empty, or written before: replaced
        if target.name == "empty":
            target.mkdir()
        if target is mine:
            (mine / "editor.json").write_text("{}")
        with atomic_dir(target, marker="editor.json") as tmp:
            (tmp / "editor.json").write_text('{"new": 1}')
        assert [p.name for p in target.iterdir()] == ["editor.json"] and "new" in (target / "editor.json").read_text()
