"""Exported editors: low-rank factors stored in float16, everything else as it was."""
import json
import re

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


@pytest.mark.parametrize("option, stored, other, bad, refusal", [
    ("lambda_scale", 3.0, 1.0, -1.0, "must be positive"),       # F times the learned regularisers
    ("prior_mix", 0.2, 0.5, 1.5, r"must lie in \[0, 1\]"),     # (1 - M) I + M P with a kept shape
])
def test_an_exported_setting_is_the_editors_own_until_a_method_option_overrides_it(tmp_path, capsys, option, stored,
                                                                                   other, bad, refusal):
    """``malmen export --lambda-scale F`` and ``--prior-mix M`` store the setting with the editor: the
    malmen method then edits with it, as the source does when the method's option asks for it, unless
    that option is given (which overrides it); a value out of range is refused, nothing written."""
    from malmen.methods import METHODS

    model, tok, editor = trained_editor(tmp_path)
    source = tmp_path / "ed"
    if option == "prior_mix":  # a mix needs a kept shape to weigh against the identity
        editor.config.regulariser, editor.config.prior_mix = "keys", other
        editor.use_statistics_of(tiny.facts(30, seed=3))
        editor.keep_prior(rank=16)
        editor.save_pretrained(source := tmp_path / "kept")
    flag, out = "--" + option.replace("_", "-"), tmp_path / "stored"
    assert main(["export", "--editor", str(source), "--out", str(out), flag, str(stored)]) == 0
    assert f"{option.replace('_', ' ')} {stored:g}" in capsys.readouterr().out
    assert json.loads((out / "editor.json").read_text())["config"][option] == stored

    def shifts(path, options):
        editor = METHODS["malmen"].build(model, tok, str(path), options)
        return editor.config, list(editor.shifts(tiny.facts(6)).values())

    def close(a, b):  # the export rounds the factors to float16
        return all(torch.allclose(x, y, rtol=1e-3, atol=1e-3 * float(y.abs().max())) for x, y in zip(a, b))

    (own_config, own), (asked_config, asked) = shifts(out, {}), shifts(source, {option: stored})
    assert getattr(own_config, option) == getattr(asked_config, option) == stored
    assert close(own, asked) and not close(own, shifts(source, {})[1])
    overridden_config, overridden = shifts(out, {option: other})
    assert getattr(overridden_config, option) == other and close(overridden, shifts(source, {option: other})[1])
    with pytest.raises(ValueError, match=refusal):
        export_editor(source, tmp_path / "bad", **{option: bad})  # EditorConfig.check
    with pytest.raises(SystemExit) as stop:  # refused while the command line is parsed
        main(["export", "--editor", str(source), "--out", str(tmp_path / "bad"), flag, str(bad)])
    assert stop.value.code == 2 and re.search(f"argument {flag}: .*{refusal}", capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()


def test_export_writes_a_hyper_network_given_loaded_and_refuses_one_of_other_modules(tmp_path):
    """``hypernet=``: the source's hyper-network already loaded (export --stats-data loads the editor)
    is written as the file's would be; one built for other modules is refused, nothing written."""
    from malmen.hypernet import HyperNetwork

    _, _, editor = trained_editor(tmp_path)
    export_editor(tmp_path / "ed", tmp_path / "read")
    export_editor(tmp_path / "ed", tmp_path / "given", hypernet=editor.hypernet)
    given, read = (tmp_path / d / "editor.safetensors" for d in ("given", "read"))
    assert given.read_bytes() == read.read_bytes()
    other = HyperNetwork({m: (a + 1, b) for m, (a, b) in editor.hypernet.shapes.items()}, editor.config.hyper)
    with pytest.raises(ValueError, match="hyper-network given was built for"):
        export_editor(tmp_path / "ed", tmp_path / "bad", hypernet=other)
    assert not (tmp_path / "bad").exists()
