"""Two processes on the CPU (gloo) edit and take a meta-training step like one process does.
Tolerance: 1e-4 relative to the largest entry: the processes' fp32 chunk products are cut and added in
another order, and the tiny model's normal equation (fewer tokens than key dimensions) amplifies that."""
import os
import subprocess
import sys
from pathlib import Path

import torch

import distributed_worker
from malmen.io import load_tensors

HERE = Path(__file__).parent


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "two.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(HERE / "distributed_worker.py"), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    two = load_tensors(out)
    one = distributed_worker.run(distributed_worker.build(), distributed_worker.tiny.facts(10, seed=3))
    assert set(two) == set(one)
    for key, value in one.items():
        scale = float(value.abs().max()) or 1.0
        assert torch.allclose(two[key], value, rtol=0, atol=1e-4 * scale), key
    assert any(k.startswith("grad/") and one[k].abs().sum() > 0 for k in one)  # the step did learn


def test_edit_under_torchrun_writes_the_single_process_model_once(tmp_path):
    """``torchrun --nproc-per-node 2 -m malmen.cli edit``: rank 0 alone prints and saves, and the
    saved model equals the one a single process makes (within the tolerance above)."""
    import tiny
    from malmen.cli import main

    tiny.write_facts(tmp_path / "f.jsonl", tiny.facts(10, seed=3))
    editor = distributed_worker.build()
    editor.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer().save_pretrained(tmp_path / "model")
    editor.save_pretrained(tmp_path / "editor")
    common = ["--model", str(tmp_path / "model"), "--editor", str(tmp_path / "editor"), "--facts", str(tmp_path / "f.jsonl")]
    assert main(["edit", *common, "--out", str(tmp_path / "one"), "--show", "1"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "malmen.cli", "edit", *common, "--out", str(tmp_path / "two"), "--show", "1"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("edited 10 facts at once") == 1 and r.stdout.count("saved the edited model") == 1
    from safetensors.torch import load_file

    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for key in one:
        assert torch.allclose(two[key], one[key], rtol=0, atol=1e-4 * float(one[key].abs().max())), key
