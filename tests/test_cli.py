import json
import subprocess
import sys

import pytest
import torch

import tiny
from malmen.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny.write_model(root / "model")
    tiny.write_facts(root / "train.jsonl", tiny.facts(80, seed=5))
    tiny.write_facts(root / "val.jsonl", tiny.facts(16, seed=6))
    return root


def test_train_edit_eval_end_to_end(workspace, capsys):
    w = workspace
    common = ["--model", str(w / "model")]
    assert main(["train", *common, "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
                 "--out", str(w / "run"), "--rank", "8", "--n-edits", "8", "--steps", "6", "--val-every", "3",
                 "--val-n", "8", "--lm-batch-size", "4"]) == 0
    assert (w / "run" / "best" / "editor.json").is_file() and (w / "run" / "last" / "optimizer.safetensors").is_file()
    log = [json.loads(l) for l in open(w / "run" / "train_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 7)) and "val_ES" in log[2]

    out = w / "edited"
    assert main(["edit", *common, "--editor", str(w / "run" / "best"), "--facts", str(w / "val.jsonl"),
                 "--out", str(out), "--show", "2"]) == 0
    printed = capsys.readouterr().out
    assert "before:" in printed and "after:" in printed and "edited 16 facts at once" in printed
    from transformers import AutoModelForCausalLM
    edited = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(w / "model")
    differ = [n for n, p in edited.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert differ and all("mlp.down_proj" in n for n in differ)

    results = w / "results.json"
    assert main(["eval", *common, "--editor", str(w / "run" / "best"), "--data", str(w / "val.jsonl"),
                 "--n-edits", "8", "--groups", "2", "--out", str(results)]) == 0
    r = json.loads(results.read_text())
    for key in ("ES", "GS", "LS", "ES_exact", "GS_gen", "LS_data"):
        assert 0.0 <= r[key] <= 1.0 and 0.0 <= r["before"][key] <= 1.0
    assert r["n_edits"] == 8 and r["n_facts"] == 16 and r["before"]["LS"] == 1.0


def test_resume_continues_from_last(workspace):
    w = workspace
    args = ["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
            "--rank", "8", "--n-edits", "8", "--val-every", "2", "--val-n", "8", "--lm-batch-size", "4"]
    assert main([*args, "--out", str(w / "full"), "--steps", "4"]) == 0
    assert main([*args, "--out", str(w / "resumed"), "--steps", "2"]) == 0
    assert main([*args, "--out", str(w / "resumed"), "--steps", "4"]) == 0
    from safetensors.torch import load_file
    a = load_file(w / "full" / "last" / "editor.safetensors")
    b = load_file(w / "resumed" / "last" / "editor.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "malmen.cli", *args], capture_output=True, text=True, timeout=300)


def test_bad_input_is_one_line_exit_2(workspace, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n')
    r = run_cli("edit", "--model", str(workspace / "model"), "--editor", "x", "--facts", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"malmen: error: {bad}: record 1: field 'target': missing"
    assert not (tmp_path / "o").exists()


def test_unknown_editor_and_module_exit_2(workspace, tmp_path):
    r = run_cli("eval", "--model", str(workspace / "model"), "--editor", str(tmp_path / "none"),
                "--data", str(workspace / "val.jsonl"), "--n-edits", "4")
    assert r.returncode == 2 and "no editor.json" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"), "--no-split",
                "--out", str(tmp_path / "run"), "--modules", "model.layers.0.mlp.nope", "--steps", "1")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"), "--no-split",
                "--out", str(tmp_path / "run"), "--eta-factor", "0.5", "--steps", "1")
    assert r.returncode == 2 and "--eta-factor needs --init-editor" in r.stderr and not (tmp_path / "run").exists()


def test_eval_fine_tuning_baseline(workspace):
    w = workspace
    out = w / "ft.json"
    assert main(["eval", "--model", str(w / "model"), "--method", "ft-l", "--data", str(w / "val.jsonl"),
                 "--n-edits", "8", "--ft-steps", "3", "--no-generate", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["method"] == "ft-l" and r["n_edits"] == 8 and 0.0 <= r["ES"] <= 1.0


def test_bench_quality_writes_json_csv_markdown(workspace):
    w = workspace
    if not (w / "run" / "best").exists():
        pytest.skip("needs the editor trained by test_train_edit_eval_end_to_end")
    out = w / "bench"
    assert main(["bench", "quality", "--model", str(w / "model"), "--methods", f"malmen={w / 'run' / 'best'}", "ft",
                 "--data", f"tiny={w / 'val.jsonl'}", "--split", "train", "--n", "1", "4", "64", "--facts-per-point", "8", "--targets", "new",
                 "--no-generate", "--ft-steps", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["method"], r["n"]) for r in rows} == {("malmen", 1), ("malmen", 4), ("ft", 1), ("ft", 4)}
    assert next(r for r in rows if r["n"] == 4)["groups"] == 2
    assert (out / "results.csv").read_text().startswith("data,target,method,n")
    md = (out / "results.md").read_text()
    assert "| tiny | new | malmen | 4 |" in md
    assert "| data | target | method | n = 1 | n = 4 |" in md and "| tiny | new | unedited |" in md


def test_train_continues_from_an_editor(workspace):
    w = workspace
    if not (w / "run" / "best").exists():
        pytest.skip("needs the editor trained by test_train_edit_eval_end_to_end")
    start = json.loads((w / "run" / "best" / "editor.json").read_text())["trainer"]["step"]
    assert main(["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
                 "--init-editor", str(w / "run" / "best"), "--out", str(w / "more"), "--n-edits", "8",
                 "--steps", str(start + 2), "--val-every", "2", "--val-n", "8", "--lm-batch-size", "4", "--c-loc", "3"]) == 0
    log = [json.loads(l) for l in open(w / "more" / "train_log.jsonl")]
    assert [r["step"] for r in log] == [start + 1, start + 2]
    meta = json.loads((w / "more" / "last" / "editor.json").read_text())
    assert meta["trainer"]["initialised_from"]["step"] == start and meta["trainer"]["train_config"]["c_loc"] == 3


def test_train_moves_an_editor_to_other_layers(workspace):
    w = workspace
    if not (w / "run" / "best").exists():
        pytest.skip("needs the editor trained by test_train_edit_eval_end_to_end")
    mods = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert main(["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
                 "--init-editor", str(w / "run" / "best"), "--modules", *mods, "--eta-factor", "2",
                 "--out", str(w / "moved"), "--n-edits", "8", "--steps", "100", "--max-minutes", "0.001",
                 "--val-every", "1", "--val-n", "8", "--lm-batch-size", "4"]) == 0
    meta = json.loads((w / "moved" / "last" / "editor.json").read_text())
    assert meta["config"]["modules"] == mods and list(meta["shapes"]) == mods
    assert meta["transplanted"]["eta_factor"] == 2 and meta["transplanted"]["sources"][mods[0]] == mods[0]
    old = json.loads((w / "run" / "best" / "editor.json").read_text())
    assert meta["config"]["hyper"] == old["config"]["hyper"]


def test_bench_speed_and_scale(workspace, capsys):
    w = workspace
    out = w / "speed.json"
    assert main(["bench", "speed", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--no-split",
                 "--edit-facts", "16", "--train-n", "8", "--steps", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("edit_facts_per_s", "limit_facts_per_s", "edit_ratio", "train_step_s", "train_step_bound_s", "train_ratio"):
        assert r[key] > 0, key
    assert r["edit_ratio"] == pytest.approx(r["edit_facts_per_s"] / r["limit_facts_per_s"])
    out = w / "scale.json"
    assert main(["bench", "scale", "--model", str(w / "model"), "--n", "20", "200", "--lm-batch-size", "8",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [p["n"] for p in r["points"]] == [20, 200] and r["rss_ratio"] > 0
    assert all(p["peak_rss_mb"] > 0 and p["seconds"] > 0 for p in r["points"])


def test_edit_dry_run_checks_estimates_and_writes_nothing(workspace, capsys):
    w = workspace
    if not (w / "run" / "best").exists():
        pytest.skip("needs the editor trained by test_train_edit_eval_end_to_end")
    assert main(["edit", "--model", str(w / "model"), "--editor", str(w / "run" / "best"), "--facts", str(w / "val.jsonl"),
                 "--out", str(w / "dry"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "dry run: 16 facts" in printed and "sums KᵀK/KᵀD" in printed and "estimated time" in printed
    assert not (w / "dry").exists()


def test_edit_with_a_fine_tuning_baseline_saves_a_bounded_change(workspace, tmp_path, capsys):
    w = workspace
    out = tmp_path / "ftl"
    assert main(["edit", "--model", str(w / "model"), "--method", "ft-l", "--ft-steps", "3", "--ft-lr", "1e-2",
                 "--ft-linf", "1e-3", "--facts", str(w / "val.jsonl"), "--out", str(out), "--show", "1"]) == 0
    assert "edited 16 facts at once" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM
    edited = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(w / "model")
    changes = [(p - base.get_parameter(n)).abs().max() for n, p in edited.named_parameters()
               if not torch.equal(p, base.get_parameter(n))]
    # FT-L bounds the shift; the weight change is that shift (transposed into the weight's layout)
    assert changes and max(changes) <= 1e-3 + 1e-6
    assert main(["edit", "--model", str(w / "model"), "--facts", str(w / "val.jsonl")]) == 2   # no editor, no method
