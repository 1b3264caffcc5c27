"""A model spread over devices with accelerate (``--device-map``): the edit equals the edit of the
same model on one device, each module's sums and shift stay beside its weight, the evaluation's
predictions do not change, and what cannot work is refused before anything loads.

CI runs the CPU cases (accelerate's hooks on, every block on the CPU); the cases that split the
model between devices skip, saying so, without CUDA (``scripts/gpu-smoke`` runs them)."""
import json

import pytest
import torch
from accelerate import dispatch_model

import tiny
from malmen.cli import main
from malmen.editor import EditorConfig, MalmenEditor
from malmen.evaluate import predictions
from malmen.hypernet import HyperConfig

CUDA = torch.cuda.is_available()
TWO_GPUS = CUDA and torch.cuda.device_count() >= 2


def block_map(layers: int, lower, upper) -> dict:
    """Embedding and the lower half of the blocks on ``lower``, the rest and the head on ``upper``."""
    half = layers // 2
    mapping = {"model.embed_tokens": lower, "model.rotary_emb": lower}
    mapping.update({f"model.layers.{i}": lower if i < half else upper for i in range(layers)})
    mapping.update({"model.norm": upper, "lm_head": upper})
    return mapping


def editor_for(model) -> MalmenEditor:
    torch.manual_seed(1)  # the same hyper-network for every model
    return MalmenEditor(model, tiny.tokenizer(), EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=3))


def spread(lower, upper):
    """A tiny Llama spread by ``block_map`` (hooks forced: the CPU-only map gets them too) and the
    same model, untouched, on the CPU."""
    reference, model = tiny.llama(), tiny.llama()
    mapping = block_map(len(model.model.layers), lower, upper)
    model = dispatch_model(model, mapping, main_device="cpu", force_hooks=True)
    assert all(hasattr(block, "_hf_hook") for block in model.model.layers)  # accelerate moves the inputs
    return reference, model


PLACEMENTS = [
    pytest.param("cpu", "cpu", id="hooks-on-cpu"),
    pytest.param(0, "cpu", id="cuda-and-cpu", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
    pytest.param(0, 1, id="two-gpus", marks=pytest.mark.skipif(not TWO_GPUS, reason="fewer than two CUDA devices")),
]


@pytest.mark.parametrize("lower, upper", PLACEMENTS)
def test_an_edit_of_a_spread_model_equals_the_edit_on_one_device(lower, upper):
    reference, model = spread(lower, upper)
    facts = tiny.facts(9)
    expected = editor_for(reference).shifts(facts)
    editor = editor_for(model)
    placement = editor.placement()
    assert {d.type for d in placement.values()} == ({"cpu"} if lower == upper == "cpu" else {"cuda"} | (
        {"cpu"} if upper == "cpu" else set()))
    aggregator = editor.new_aggregator()
    assert all(part.device == placement[name] for name, part in aggregator.parts.items())
    shifts = editor.shifts(facts)
    for name, shift in shifts.items():
        assert shift.device == placement[name]  # the shift was solved beside its weight
        if lower == upper == "cpu":
            assert torch.equal(shift, expected[name])
        else:  # other kernels, another order of reduction
            assert torch.allclose(shift.cpu(), expected[name], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("lower, upper", PLACEMENTS)
def test_a_spread_model_edits_reverts_and_predicts_as_on_one_device(lower, upper):
    reference, model = spread(lower, upper)
    facts = tiny.facts(6, seed=3)
    prompts, answers = [f.prompt for f in facts], [f.target for f in facts]
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(a[0], b[0]) for a, b in zip(predictions(editor_for(model).adapter, prompts, answers),
                                                        predictions(editor_for(reference).adapter, prompts, answers)))
    handle = editor_for(model).edit(facts)
    editor_for(reference).edit(facts)
    for name in handle.shifts:
        weight = model.get_submodule(name).weight
        assert torch.allclose(weight.cpu(), reference.get_submodule(name).weight, rtol=1e-4, atol=1e-6)
    edited = predictions(editor_for(model).adapter, prompts, answers)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(edited, predictions(editor_for(reference).adapter, prompts, answers)))
    handle.revert()
    assert all(torch.equal(p.cpu(), before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("lower, upper", PLACEMENTS)
def test_the_evaluation_of_a_spread_model_equals_the_one_device_evaluation(lower, upper):
    """``evaluate`` replays the unchanged blocks and generates: both work across the devices."""
    from malmen.evaluate import METRICS, evaluate

    reference, model = spread(lower, upper)
    facts = tiny.facts(6, seed=4)
    got, expected = (evaluate(editor_for(m), facts, 3, generate=True) for m in (model, reference))
    for key in METRICS:
        if key in expected:
            assert got[key] == expected[key] and got["before"][key] == expected["before"][key], key


def test_a_module_the_map_offloads_is_refused(tmp_path):
    """An offloaded block's weights are on the meta device until its forward: nothing to edit."""
    model = tiny.llama()
    mapping = block_map(len(model.model.layers), "cpu", "cpu")
    mapping["model.layers.3"] = "disk"
    model = dispatch_model(model, mapping, main_device="cpu", offload_dir=str(tmp_path))
    with pytest.raises(ValueError, match="model.layers.3.mlp.down_proj.*offloaded"):
        editor_for(model)


def test_the_command_line_edits_a_model_spread_by_a_map_and_saves_it(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny.write_model(tmp_path / "model")
    tiny.write_facts(tmp_path / "train.jsonl", tiny.facts(16, seed=2))
    tiny.write_facts(tmp_path / "facts.jsonl", tiny.facts(5))
    model = ["--model", str(tmp_path / "model")]
    assert main(["train", *model, "--data", str(tmp_path / "train.jsonl"), "--val-data", str(tmp_path / "facts.jsonl"),
                 "--rank", "8", "--n-edits", "4", "--steps", "1", "--val-every", "1", "--val-n", "4",
                 "--lm-batch-size", "4", "--out", str(tmp_path / "editor")]) == 0
    (tmp_path / "map.json").write_text(json.dumps({"": "cpu"}))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for name, value in (("auto", "auto"), ("file", str(tmp_path / "map.json"))):
        out = tmp_path / f"edited-{name}"
        assert main(["edit", *model, "--editor", str(tmp_path / "editor" / "best"), "--facts",
                     str(tmp_path / "facts.jsonl"), "--device-map", value, "--out", str(out), "--show", "1"]) == 0
        edited = AutoModelForCausalLM.from_pretrained(out)
        assert any(not torch.equal(p, base.get_parameter(n)) for n, p in edited.named_parameters())


@pytest.mark.parametrize("extra, env, message", [
    (["--device-map", "everywhere"], {}, "--device-map must be one of auto"),
    (["--device-map", "MAP"], {}, "field 'model.layers.0': a device is a GPU index or a name"),
    (["--device-map", "TYPO"], {}, "field 'model.layers.0': a device is a GPU index or a name"),
    (["--device-map", "missing.json"], {}, "missing.json: No such file"),
    (["--device-map", "auto", "--model", "minilm-factcheck"], {}, "minilm-factcheck is a classifier head's small encoder"),
    (["--device-map", "auto", "--method", "ft"], {}, "--device-map works with --method malmen, mend, not --method ft"),
    (["--device-map", "auto"], {"WORLD_SIZE": "2"}, "under torchrun"),
])
def test_a_device_map_that_cannot_work_is_refused_before_loading(tmp_path, capsys, monkeypatch, extra, env, message):
    tiny.write_facts(tmp_path / "facts.jsonl", tiny.facts(2))
    (tmp_path / "map.json").write_text(json.dumps({"model.layers.0": [0, 1]}))
    (tmp_path / "typo.json").write_text(json.dumps({"model.layers.0": "gpu:0"}))
    files = {"MAP": str(tmp_path / "map.json"), "TYPO": str(tmp_path / "typo.json")}
    extra = [files.get(x, x) for x in extra]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    for command in (["edit", "--facts", "facts.jsonl"], ["eval", "--data", "facts.jsonl"]):
        # a model that does not exist: a refusal must come before any attempt to load it
        code = main([*command, "--model", str(tmp_path / "no-model"), "--editor", "smollm2-zsre", *extra])
        assert code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_load_model_refuses_to_spread_a_classifier_heads_encoder():
    from malmen.models import load_model

    with pytest.raises(ValueError, match="loads on one device"):
        load_model("minilm-factcheck", device_map="auto")
