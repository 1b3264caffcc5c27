"""Exported editors: low-rank factors stored in float16, everything else as it was."""
import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from malmen.cli import main
from malmen.editor import EditorConfig, MalmenEditor
from malmen.export import export_editor
from malmen.hypernet import HyperConfig


def trained_editor(tmp_path):
    """A tiny editor with every parameter moved off its initial value, saved in float32."""
    model, tok = tiny.llama(), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=0.5)))
    with torch.no_grad():
        for p in editor.hypernet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    editor.save_pretrained(tmp_path / "ed", extra={"trainer": {"step": 7}})
    return model, tok, editor


def test_factors_are_stored_in_float16_and_load_back_rounded(tmp_path):
    model, tok, editor = trained_editor(tmp_path)
    export_editor(tmp_path / "ed", tmp_path / "half")
    stored, full = load_file(str(tmp_path / "half" / "editor.safetensors")), load_file(str(tmp_path / "ed" / "editor.safetensors"))
    assert stored.keys() == full.keys()
    factors = [k for k in stored if k.rsplit(".", 1)[-1] in ("U", "V")]
    assert len(factors) == 2 * editor.config.hyper.n_blocks * len(editor.hypernet.nets)
    for k, v in stored.items():  # the factors halved, the rest (normalisers, scalars) untouched
        assert v.dtype == (torch.float16 if k in factors else full[k].dtype)
        assert torch.equal(v, full[k].half() if k in factors else full[k])
    meta, source = (json.loads((tmp_path / d / "editor.json").read_text()) for d in ("half", "ed"))
    assert meta == {**source, "stored_factors": "float16"}
    editor.save_pretrained(tmp_path / "direct", factor_dtype=torch.float16)  # the same from the editor itself
    direct = load_file(str(tmp_path / "direct" / "editor.safetensors"))
    assert all(direct[k].dtype == v.dtype and torch.equal(direct[k], v) for k, v in stored.items())
    assert json.loads((tmp_path / "direct" / "editor.json").read_text())["stored_factors"] == "float16"

    loaded = MalmenEditor.from_pretrained(tmp_path / "half", model, tok)
    state = loaded.hypernet.state_dict()
    assert all(state[k].dtype == full[k].dtype for k in full)  # cast back on loading
    assert all(torch.equal(state[k], full[k].half().float() if k in factors else full[k]) for k in full)
    facts = tiny.facts(6)
    exact, rounded = editor.shifts(facts), loaded.shifts(facts)
    for name in exact:  # float16 keeps 11 significant bits: the shifts differ by about that
        err = (rounded[name] - exact[name]).norm() / exact[name].norm()
        assert 0 < err < 5e-3


def test_saving_a_loaded_export_in_float32_drops_the_record(tmp_path):
    model, tok, _ = trained_editor(tmp_path)
    export_editor(tmp_path / "ed", tmp_path / "ed")  # in place
    assert json.loads((tmp_path / "ed" / "editor.json").read_text())["stored_factors"] == "float16"
    loaded = MalmenEditor.from_pretrained(tmp_path / "ed", model, tok)
    loaded.save_pretrained(tmp_path / "again")
    assert "stored_factors" not in json.loads((tmp_path / "again" / "editor.json").read_text())
    assert all(v.dtype != torch.float16 for v in load_file(str(tmp_path / "again" / "editor.safetensors")).values())


def test_export_refuses_a_file_that_does_not_match_its_json(tmp_path):
    trained_editor(tmp_path)
    meta = json.loads((tmp_path / "ed" / "editor.json").read_text())
    meta["config"]["hyper"]["rank"] = 4
    (tmp_path / "ed" / "editor.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match editor.json") as err:
        export_editor(tmp_path / "ed", tmp_path / "out")
    assert "\n" not in str(err.value) and "size mismatch for " in str(err.value)  # one line, naming a tensor
    assert not (tmp_path / "out").exists()


def test_export_command(tmp_path, capsys):
    trained_editor(tmp_path)
    assert main(["export", "--editor", str(tmp_path / "ed"), "--out", str(tmp_path / "half")]) == 0
    assert "factors in float16" in capsys.readouterr().out
    made = json.loads((tmp_path / "half" / "editor.json").read_text())["commands"]
    assert made[-1] == f"malmen export --editor {tmp_path / 'ed'} --out {tmp_path / 'half'}"
    assert (tmp_path / "half" / "editor.safetensors").stat().st_size < (tmp_path / "ed" / "editor.safetensors").stat().st_size
    assert main(["export", "--editor", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "no editor.json" in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", "--editor", str(tmp_path / "ed"), "--out", str(tmp_path / "mine")]) == 2
    assert "holds no editor.json" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"  # a directory not an editor's is never replaced


def test_an_exported_lambda_scale_is_the_editors_own_until_a_method_option_overrides_it(tmp_path, capsys):
    """``malmen export --lambda-scale F`` stores F with the editor; the malmen method then solves with F
    times the learned regularisers unless ``--lambda-scale`` is given (1 restores the learned ones)."""
    from malmen.methods import METHODS

    model, tok, editor = trained_editor(tmp_path)
    assert main(["export", "--editor", str(tmp_path / "ed"), "--out", str(tmp_path / "x3"), "--lambda-scale", "3"]) == 0
    assert "lambda scale 3" in capsys.readouterr().out
    assert json.loads((tmp_path / "x3" / "editor.json").read_text())["config"]["lambda_scale"] == 3.0
    facts = tiny.facts(6)
    own = METHODS["malmen"].build(model, tok, str(tmp_path / "x3"), {})
    assert own.config.lambda_scale == 3.0
    restored = METHODS["malmen"].build(model, tok, str(tmp_path / "x3"), {"lambda_scale": 1.0})
    assert restored.config.lambda_scale == 1.0
    export_editor(tmp_path / "ed", tmp_path / "half")
    half = MalmenEditor.from_pretrained(tmp_path / "half", model, tok)  # the same export at the learned λ
    for a, b in zip(restored.shifts(facts).values(), half.shifts(facts).values()):
        assert torch.equal(a, b)
    for a, b in zip(own.shifts(facts).values(), half.shifts(facts).values()):
        assert not torch.allclose(a, b, rtol=1e-3)  # three times λ writes less
        assert a.norm() < b.norm()
    with pytest.raises(ValueError, match="positive"):
        export_editor(tmp_path / "ed", tmp_path / "bad", lambda_scale=0.0)
    with pytest.raises(SystemExit) as stop:  # refused while the command line is parsed
        main(["export", "--editor", str(tmp_path / "ed"), "--out", str(tmp_path / "bad"), "--lambda-scale", "-1"])
    assert stop.value.code == 2 and "must be positive" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_an_exported_prior_mix_is_the_editors_own_until_a_method_option_overrides_it(tmp_path, capsys):
    """``malmen export --prior-mix M`` stores M: an editor with a kept shape then edits with
    (1 - M) I + M P, as ``eval --prior-mix M`` does with the source, which still overrides it."""
    from malmen.methods import METHODS

    model, tok, editor = trained_editor(tmp_path)
    editor.config.regulariser, editor.config.prior_mix = "keys", 0.5
    editor.use_statistics_of(tiny.facts(30, seed=3))
    editor.keep_prior(rank=16)
    editor.save_pretrained(tmp_path / "kept")
    assert main(["export", "--editor", str(tmp_path / "kept"), "--out", str(tmp_path / "m02"), "--prior-mix", "0.2"]) == 0
    assert "prior mix 0.2" in capsys.readouterr().out
    assert json.loads((tmp_path / "m02" / "editor.json").read_text())["config"]["prior_mix"] == 0.2
    facts = tiny.facts(6)
    own = METHODS["malmen"].build(model, tok, str(tmp_path / "m02"), {})
    asked = METHODS["malmen"].build(model, tok, str(tmp_path / "kept"), {"prior_mix": 0.2})
    assert own.config.prior_mix == asked.config.prior_mix == 0.2
    for a, b in zip(own.shifts(facts).values(), asked.shifts(facts).values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))  # the export rounds the factors to float16
    source = METHODS["malmen"].build(model, tok, str(tmp_path / "kept"), {})
    for a, b in zip(own.shifts(facts).values(), source.shifts(facts).values()):
        assert not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))  # mix 0.2 is not the source's 0.5
    with pytest.raises(SystemExit) as stop:  # refused while the command line is parsed
        main(["export", "--editor", str(tmp_path / "kept"), "--out", str(tmp_path / "bad"), "--prior-mix", "1.5"])
    assert stop.value.code == 2 and "must lie in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
