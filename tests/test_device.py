"""Device placement: the same edit, training, resume and cache spill on every device at hand.

CI runs the CPU cases; ``scripts/gpu-smoke`` runs the CUDA ones (they skip, saying so, where no
CUDA device exists)."""
import json

import pytest
import torch

import tiny
from malmen.cli import main
from malmen.editor import EditorConfig, MalmenEditor
from malmen.hypernet import HyperConfig

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def same(a: dict, b: dict, device: str) -> bool:
    """Bitwise on the CPU; on CUDA, where reductions may run in another order, within 1e-5."""
    if a.keys() != b.keys():
        return False
    if device == "cpu":
        return all(torch.equal(a[k], b[k]) for k in a)
    return all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5) for k in a)


@pytest.mark.parametrize("device", DEVICES)
def test_edit_and_revert_on_the_device(device):
    model, tok = tiny.llama(), tiny.tokenizer()
    model.to(device)
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=3))
    assert next(editor.hypernet.parameters()).device.type == device
    before = {n: p.clone() for n, p in model.named_parameters()}
    handle = editor.edit(tiny.facts(7))
    assert all(s.device.type == device and torch.isfinite(s).all() for s in handle.shifts.values())
    handle.revert()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_train_resume_with_a_spilled_cache_then_edit_and_save(device, tmp_path):
    """Resuming puts Adam's state on the parameters' device; a step cache spilled to
    memory-mapped files feeds the device chunk by chunk; the saved edited model reloads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tiny.write_model(tmp_path / "model")
    tiny.write_facts(tmp_path / "train.jsonl", tiny.facts(48, seed=5))
    tiny.write_facts(tmp_path / "val.jsonl", tiny.facts(8, seed=6))
    common = ["--model", str(tmp_path / "model"), "--device", device]
    train = ["train", *common, "--data", str(tmp_path / "train.jsonl"), "--val-data", str(tmp_path / "val.jsonl"),
             "--rank", "8", "--n-edits", "8", "--val-every", "2", "--val-n", "8", "--lm-batch-size", "4",
             "--cache-budget-mb", "0"]
    assert main([*train, "--out", str(tmp_path / "full"), "--steps", "4"]) == 0
    assert main([*train, "--out", str(tmp_path / "cut"), "--steps", "2"]) == 0
    assert main([*train, "--out", str(tmp_path / "cut"), "--steps", "4"]) == 0
    a = load_file(tmp_path / "full" / "last" / "editor.safetensors")
    b = load_file(tmp_path / "cut" / "last" / "editor.safetensors")
    assert same(a, b, device)
    assert json.loads((tmp_path / "cut" / "last" / "editor.json").read_text())["trainer"]["step"] == 4
    out = tmp_path / "edited"
    assert main(["edit", *common, "--editor", str(tmp_path / "full" / "best"), "--facts", str(tmp_path / "val.jsonl"),
                 "--out", str(out), "--show", "1"]) == 0
    edited = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert any(not torch.equal(p, base.get_parameter(n)) for n, p in edited.named_parameters())
