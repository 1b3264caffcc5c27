"""The command line on a tiny model.  Every test builds what it needs through fixtures, so any
subset, in any order, runs the same."""
import json
import shlex
import subprocess
import sys
import time

import pytest
import torch

import tiny
from malmen.cli import main

TRAIN = ["--rank", "8", "--n-edits", "8", "--val-n", "8", "--lm-batch-size", "4"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny.write_model(root / "model")
    tiny.write_facts(root / "train.jsonl", tiny.facts(80, seed=5))
    tiny.write_facts(root / "val.jsonl", tiny.facts(16, seed=6))
    return root


@pytest.fixture(scope="module")
def trained(workspace):
    """A run directory trained for 6 steps (validated at steps 3 and 6)."""
    w = workspace
    assert main(["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
                 "--out", str(w / "run"), "--steps", "6", "--val-every", "3", *TRAIN]) == 0
    return w / "run"


def load_tiny(workspace):
    from malmen.models import load_model

    return load_model(str(workspace / "model"))


def test_train_writes_best_last_and_one_log_line_per_step(trained):
    assert (trained / "best" / "editor.json").is_file() and (trained / "last" / "optimizer.safetensors").is_file()
    log = [json.loads(line) for line in open(trained / "train_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert [("val_ES" in r) for r in log] == [False, False, True, False, False, True]


def test_edit_saves_a_model_that_transformers_reloads(workspace, trained, capsys):
    from transformers import AutoModelForCausalLM

    from malmen.datasets import load_facts
    from malmen.editor import MalmenEditor

    w, out = workspace, workspace / "edited"
    assert main(["edit", "--model", str(w / "model"), "--editor", str(trained / "best"), "--facts", str(w / "val.jsonl"),
                 "--out", str(out), "--show", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("before:") == 2 and printed.count("after:") == 2 and "edited 16 facts at once" in printed
    assert "fit: the solve wrote" in printed and "mlp.down_proj" in printed.split("fit:")[1] and "room: " in printed
    edited = AutoModelForCausalLM.from_pretrained(out)
    # the reference: the same edit in this process
    model, tok = load_tiny(w)
    MalmenEditor.from_pretrained(trained / "best", model, tok).edit(load_facts(w / "val.jsonl"))
    base = AutoModelForCausalLM.from_pretrained(w / "model")
    changed = [n for n, p in edited.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed and all("mlp.down_proj" in n for n in changed)
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in edited.named_parameters())


def test_eval_reports_what_the_library_computes(workspace, trained):
    from malmen.datasets import load_facts
    from malmen.editor import MalmenEditor
    from malmen.evaluate import evaluate

    w, results = workspace, workspace / "results.json"
    assert main(["eval", "--model", str(w / "model"), "--editor", str(trained / "best"), "--data", str(w / "val.jsonl"),
                 "--n-edits", "8", "--groups", "2", "--out", str(results)]) == 0
    r = json.loads(results.read_text())
    assert r["n_edits"] == 8 and r["n_facts"] == 16 and r["method"] == "malmen" and r["before"]["LS"] == 1.0
    model, tok = load_tiny(w)
    reference = evaluate(MalmenEditor.from_pretrained(trained / "best", model, tok), list(load_facts(w / "val.jsonl")), 8)
    for key in ("ES", "GS", "LS", "ES_exact", "GS_exact", "ES_gen", "GS_gen", "LS_data"):
        assert r[key] == reference[key] and r["before"][key] == reference["before"][key], key
    for key in ("fit", "room"):
        assert r[key] == pytest.approx(reference[key], abs=1e-9) and len(r[key]) == len(reference[key]) > 0


def test_eval_ppl_text_reports_the_perplexity_and_a_text_that_cannot_serve_is_refused_before_loading(workspace, trained,
                                                                                                  tmp_path):
    from malmen.adapters import adapter_for
    from malmen.perplexity import perplexity, windows

    w, results, prose = workspace, tmp_path / "results.json", tmp_path / "prose.txt"
    prose.write_text("Rain fell on the quiet town while the baker opened his shop before dawn. " * 20)
    assert main(["eval", "--model", str(w / "model"), "--editor", str(trained / "best"), "--data", str(w / "val.jsonl"),
                 "--n-edits", "8", "--no-generate", "--ppl-text", str(prose), "--ppl-tokens", "64", "--out", str(results)]) == 0
    r = json.loads(results.read_text())
    model, tok = load_tiny(w)
    rows = windows(tok, prose.read_text(), limit=64)
    assert r["before"]["PPL"] == pytest.approx(perplexity(adapter_for(model, tok), rows), rel=1e-6)
    assert r["ppl_tokens"] == 64 and r["PPL"] > 0 and r["ppl_text"] == str(prose)
    missing = tmp_path / "none.txt"
    r = run_cli("eval", "--model", str(tmp_path / "no-model"), "--editor", str(trained / "best"), "--data",
                str(w / "val.jsonl"), "--ppl-text", str(missing), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"malmen: error: {missing}: cannot be read as UTF-8 text (FileNotFoundError)"
    assert not (tmp_path / "o").exists()


def test_a_rephrase_share_is_kept_by_export_and_refused_before_loading_without_facts_that_have_rephrases(
        workspace, trained, tmp_path, capsys):
    """--rephrase-share: export keeps the blended shape and records the share; without --stats-data,
    or with facts that have no rephrases, it is refused (exit 2) before the model loads (none here)."""
    from malmen.facts import Fact

    w, out = workspace, tmp_path / "kept"
    tiny.write_facts(tmp_path / "stats.jsonl", tiny.facts(200, seed=8))
    assert main(["export", "--editor", str(trained / "best"), "--out", str(out), "--model", str(w / "model"),
                 "--stats-data", str(tmp_path / "stats.jsonl"), "--stats-texts", "200", "--stats-rank", "16",
                 "--rephrase-share", "0.5"]) == 0
    assert "rephrase share 0.5" in capsys.readouterr().out
    kept = json.loads((out / "editor.json").read_text())["kept_prior"]
    assert kept["rephrase_share"] == 0.5 and "rephrases' key moves" in kept["source"]
    bare = [Fact(prompt=f.prompt, target=f.target, locality_prompt=f.locality_prompt, locality_answer=f.locality_answer)
            for f in tiny.facts(50, seed=8)]
    tiny.write_facts(tmp_path / "bare.jsonl", bare)
    nowhere = str(tmp_path / "no-model")
    for argv, message in (
            (["eval", "--editor", str(out), "--data", str(w / "val.jsonl"), "--n-edits", "8", "--rephrase-share", "0.5",
              "--out", str(tmp_path / "r.json")], "--rephrase-share needs --stats-data"),
            (["export", "--editor", str(out), "--out", str(tmp_path / "x"), "--stats-data", str(tmp_path / "bare.jsonl"),
              "--rephrase-share", "0.5"], "bare.jsonl: no rephrases among the first")):
        assert main([*argv, "--model", nowhere]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "r.json").exists()


def test_export_keeps_a_regulariser_shaped_by_a_fact_files_locality_keys(workspace, trained, tmp_path):
    """export --stats-data: the editor carries the shape (prior.safetensors, regulariser 'keys') and
    edits with it without the file, as the library's editor with the same kept shape; exporting it
    again keeps it; too few keys for the key size are refused and nothing is written."""
    from malmen.datasets import load_facts
    from malmen.editor import MalmenEditor
    from malmen.evaluate import evaluate

    w = workspace
    tiny.write_facts(tmp_path / "stats.jsonl", tiny.facts(200, seed=8))
    out, again, results = tmp_path / "kept", tmp_path / "again", tmp_path / "r.json"
    common = ["--model", str(w / "model"), "--stats-data", str(tmp_path / "stats.jsonl"), "--stats-rank", "16"]
    assert main(["export", "--editor", str(trained / "best"), "--out", str(out), "--factor-dtype", "float32",
                 "--stats-texts", "200", *common]) == 0
    meta = json.loads((out / "editor.json").read_text())
    assert meta["config"]["regulariser"] == "keys" and meta["kept_prior"]["rank"] == 16
    assert (out / "prior.safetensors").is_file() and meta["commands"][-1].startswith("malmen export ")
    # the hyper-network loaded to keep the shape is the one written: the same bytes as an export without it
    assert main(["export", "--editor", str(trained / "best"), "--out", str(tmp_path / "plain"), "--factor-dtype",
                 "float32"]) == 0
    assert (out / "editor.safetensors").read_bytes() == (tmp_path / "plain" / "editor.safetensors").read_bytes()
    assert main(["eval", "--model", str(w / "model"), "--editor", str(out), "--data", str(w / "val.jsonl"),
                 "--n-edits", "8", "--no-generate", "--out", str(results)]) == 0
    r = json.loads(results.read_text())
    model, tok = load_tiny(w)
    editor = MalmenEditor.from_pretrained(trained / "best", model, tok)
    editor.config.regulariser = "keys"
    editor.use_statistics_of(list(load_facts(tmp_path / "stats.jsonl", split="train"))[:200])
    editor.keep_prior(16)
    val = list(load_facts(w / "val.jsonl"))[:8]
    reference = evaluate(editor, val, 8, generate=False)
    assert all(r[key] == reference[key] for key in ("ES", "GS", "LS"))
    assert main(["export", "--editor", str(out), "--out", str(again)]) == 0
    assert (again / "prior.safetensors").read_bytes() == (out / "prior.safetensors").read_bytes()
    assert main(["export", "--editor", str(trained / "best"), "--out", str(tmp_path / "few"), "--stats-texts", "20",
                 *common]) == 2
    assert not (tmp_path / "few").exists()


@pytest.mark.parametrize("command", ["eval", "edit"])
def test_stats_data_is_read_once_and_the_checked_facts_are_used(workspace, trained, tmp_path, monkeypatch, command):
    """eval/edit --stats-data: the file is read once, by the check before loading (with --target and
    --format), and the method uses those facts, not a second read with the defaults."""
    import malmen.datasets as datasets

    reads, real = [], datasets.load_facts
    monkeypatch.setattr(datasets, "load_facts", lambda path, *a, **k: reads.append(str(path)) or real(path, *a, **k))
    w, stats = workspace, str(workspace / "train.jsonl")
    where = (["--data", str(w / "val.jsonl"), "--n-edits", "8", "--no-generate"] if command == "eval" else
             ["--facts", str(w / "val.jsonl"), "--out", str(tmp_path / "edited")])
    assert main([command, "--model", str(w / "model"), "--editor", str(trained / "best"), *where, "--regulariser", "keys",
                 "--stats-data", stats, "--stats-texts", "40", "--prior-mix", "0.5", "--rephrase-share", "0.5", "--format", "facts"]) == 0
    assert reads.count(stats) == 1


def test_eval_with_a_keys_shaped_regulariser_reports_what_the_library_computes(workspace, trained):
    """--regulariser keys --stats-data: the key statistics at the locality answers of the file's
    train part (the first --stats-texts facts); the same figures as the library's editor so set."""
    from malmen.datasets import load_facts
    from malmen.editor import MalmenEditor
    from malmen.evaluate import evaluate

    w, results = workspace, workspace / "results-keys.json"
    assert main(["eval", "--model", str(w / "model"), "--editor", str(trained / "best"), "--data", str(w / "val.jsonl"),
                 "--n-edits", "8", "--no-generate", "--regulariser", "keys", "--stats-data", str(w / "train.jsonl"),
                 "--stats-texts", "40", "--prior-mix", "0.5", "--lambda-scale", "2", "--out", str(results)]) == 0
    r = json.loads(results.read_text())
    model, tok = load_tiny(w)
    editor = MalmenEditor.from_pretrained(trained / "best", model, tok)
    editor.config.regulariser, editor.config.prior_mix, editor.config.lambda_scale = "keys", 0.5, 2.0
    editor.stats_facts = [f for f in load_facts(w / "train.jsonl", split="train")][:40]
    reference = evaluate(editor, list(load_facts(w / "val.jsonl"))[:8], 8, generate=False)
    plain = evaluate(MalmenEditor.from_pretrained(trained / "best", model, tok), list(load_facts(w / "val.jsonl"))[:8], 8,
                     generate=False)
    assert all(r[key] == reference[key] for key in ("ES", "GS", "LS"))
    assert any(r[key] != plain[key] for key in ("ES", "GS", "LS"))  # the shape changed the edit


def test_resume_continues_from_last(workspace):
    w = workspace
    args = ["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
            "--val-every", "2", *TRAIN]
    assert main([*args, "--out", str(w / "full"), "--steps", "4"]) == 0
    assert main([*args, "--out", str(w / "resumed"), "--steps", "2"]) == 0
    assert main([*args, "--out", str(w / "resumed"), "--steps", "4"]) == 0
    from safetensors.torch import load_file
    a = load_file(w / "full" / "last" / "editor.safetensors")
    b = load_file(w / "resumed" / "last" / "editor.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the editor keeps every command that made it, as typed, the resumed run's after the first's
    commands = json.loads((w / "resumed" / "last" / "editor.json").read_text())["commands"]
    assert commands == [shlex.join(["malmen", *args, "--out", str(w / "resumed"), "--steps", s]) for s in ("2", "4")]


def test_a_run_saved_before_lambda_s_exponent_resumes_and_learns_it(workspace, trained, tmp_path):
    """A run whose last/ has no lambda_exponent (nor Adam state for it) resumes: the other
    parameters keep their Adam state (alpha's comes last in the optimizer), alpha starts at 0 and moves."""
    import shutil

    from malmen import io

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    weights = io.load_tensors(run / "last" / "editor.safetensors")
    state = io.load_tensors(run / "last" / "optimizer.safetensors")
    alpha = max(int(k.split(".", 1)[0]) for k in state)  # alpha's index among the optimizer's parameters: the last
    io.save_tensors(run / "last" / "optimizer.safetensors", {k: v for k, v in state.items() if int(k.split(".", 1)[0]) != alpha})
    io.save_tensors(run / "last" / "editor.safetensors", {k: v for k, v in weights.items() if k != "lambda_exponent"})
    w = workspace
    assert main(["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
                 "--out", str(run), "--steps", "8", "--val-every", "3", *TRAIN]) == 0
    after = io.load_tensors(run / "last" / "editor.safetensors")
    assert after["lambda_exponent"].abs().min() > 0
    assert not torch.equal(after["log_lambda"], weights["log_lambda"])


def test_train_cycles_through_a_mix_of_n(workspace, tmp_path):
    w = workspace
    assert main(["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
                 "--out", str(tmp_path / "mix"), "--steps", "3", "--val-every", "3", *TRAIN[:2],
                 "--n-edits", "4", "8", *TRAIN[4:]]) == 0
    log = [json.loads(line) for line in open(tmp_path / "mix" / "train_log.jsonl")]
    assert [r["n_edits"] for r in log] == [4, 8, 4] and "val_ES" in log[-1]
    config = json.loads((tmp_path / "mix" / "best" / "editor.json").read_text())["trainer"]["train_config"]
    assert config["n_edits"] == [4, 8]


def test_resuming_with_another_rank_is_refused_in_one_line(workspace, trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "last" / "editor.safetensors").read_bytes()
    r = run_cli("train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"),
                "--val-data", str(workspace / "val.jsonl"), "--out", str(run), "--steps", "8",
                *TRAIN[:1], "16", *TRAIN[2:])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"malmen: error: {run / 'last' / 'editor.safetensors'}: does not match this run's editor "
                           "(its modules and rank) (size mismatch for "), r.stderr
    assert (run / "last" / "editor.safetensors").read_bytes() == before


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "malmen.cli", *args], capture_output=True, text=True, timeout=300)


def test_bad_facts_are_reported_before_the_model_is_loaded(trained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n')
    # a model that does not exist: had it been loaded first, its error would be the one reported
    r = run_cli("edit", "--model", str(tmp_path / "no-model"), "--editor", str(trained / "best"), "--facts", str(bad),
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"malmen: error: {bad}: record 2: field 'target': missing"
    assert not (tmp_path / "o").exists()


def test_a_non_positive_lambda_scale_is_refused_before_the_model_is_loaded(trained, tmp_path):
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "a", "target": "b"}\n')
    r = run_cli("edit", "--model", str(tmp_path / "no-model"), "--editor", str(trained / "best"), "--facts", str(facts),
                "--lambda-scale", "0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "argument --lambda-scale: must be positive, not 0" in r.stderr
    assert "no-model" not in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--regulariser", "diagonal"], "argument --regulariser: choose identity or keys, not diagonal"),
    (["--prior-mix", "1.5"], "argument --prior-mix: must lie in [0, 1], not 1.5"),
    (["--regulariser", "keys", "--stats-data", "NOLOC"], "no locality prompts among the first"),
    (["--regulariser", "keys", "--stats-data", "BAD"], "record 2: field 'target': missing"),
])
def test_a_bad_regulariser_setting_is_refused_before_the_model_is_loaded(trained, tmp_path, extra, message):
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "a", "target": "b"}\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n')
    (tmp_path / "noloc.jsonl").write_text("".join(f'{{"prompt": "p{i}", "target": "t"}}\n' for i in range(10)))
    files = {"NOLOC": str(tmp_path / "noloc.jsonl"), "BAD": str(tmp_path / "bad.jsonl")}
    r = run_cli("eval", "--model", str(tmp_path / "no-model"), "--editor", str(trained / "best"), "--data", str(facts),
                *[files.get(x, x) for x in extra], "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and message in r.stderr.splitlines()[-1], r.stderr  # argparse prints its usage first
    assert "no-model" not in r.stderr and not (tmp_path / "o").exists()


def test_unknown_editor_fails_in_under_three_seconds(tmp_path):
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "The capital of France is", "target": "Lyon"}\n')
    start = time.perf_counter()
    r = run_cli("edit", "--editor", "smollm2-zsree", "--facts", str(facts), "--out", str(tmp_path / "o"))  # the default model
    seconds = time.perf_counter() - start
    assert r.returncode == 2 and "smollm2-zsree: no editor.json there and no shipped editor" in r.stderr
    assert seconds < 3.0 and "Traceback" not in r.stderr and not (tmp_path / "o").exists()


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
    r = run_cli("train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"), "--no-split",
                "--out", str(tmp_path / "run"), "--first-token-weight", "0", "--steps", "1")
    assert r.returncode == 2 and "--first-token-weight: must be positive" in r.stderr and not (tmp_path / "run").exists()


def test_method_and_editor_must_agree(workspace, trained):
    r = run_cli("eval", "--model", str(workspace / "no-model"), "--method", "mend", "--editor", str(trained / "best"),
                "--data", str(workspace / "val.jsonl"))
    assert r.returncode == 2 and "trained with 'malmen' aggregation" in r.stderr and "--method malmen" in r.stderr
    r = run_cli("edit", "--model", str(workspace / "no-model"), "--facts", str(workspace / "val.jsonl"))
    assert r.returncode == 2 and "give a trained editor" in r.stderr


def test_eval_fine_tuning_baseline_reports_what_the_library_computes(workspace):
    from malmen.baselines import FineTuneConfig, FineTuneEditor
    from malmen.datasets import load_facts
    from malmen.evaluate import evaluate

    w, out = workspace, workspace / "ft.json"
    assert main(["eval", "--model", str(w / "model"), "--method", "ft-l", "--data", str(w / "val.jsonl"),
                 "--n-edits", "8", "--ft-steps", "3", "--ft-linf", "1e-3", "--no-generate", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    model, tok = load_tiny(w)
    editor = FineTuneEditor(model, tok, FineTuneConfig(steps=3, lr=5e-3, linf=1e-3))
    reference = evaluate(editor, list(load_facts(w / "val.jsonl"))[:8], 8, generate=False)
    assert r["method"] == "ft-l" and r["n_edits"] == 8
    assert all(r[k] == reference[k] for k in ("ES", "GS", "LS", "LS_data"))


def test_bench_quality_writes_json_csv_markdown(workspace, trained):
    w, out = workspace, workspace / "bench"
    assert main(["bench", "quality", "--model", str(w / "model"), "--methods", f"malmen={trained / 'best'}", "ft",
                 "--data", f"tiny={w / 'val.jsonl'}", "--split", "train", "--n", "1", "4", "64", "--facts-per-point", "8",
                 "--targets", "new", "--no-generate", "--ft-steps", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["method"], r["n"]) for r in rows} == {("malmen", 1), ("malmen", 4), ("ft", 1), ("ft", 4)}
    assert next(r for r in rows if r["n"] == 4)["groups"] == 2
    assert all(0.0 < r["fit"] <= 1.0 and 0.0 < r["room"] <= 1.0 for r in rows if r["method"] == "malmen")
    assert not any("fit" in r or "room" in r for r in rows if r["method"] == "ft")
    assert (out / "results.csv").read_text().startswith("data,target,method,n")
    md = (out / "results.md").read_text()
    assert "| tiny | new | malmen | 4 |" in md
    assert "| data | target | method | n = 1 | n = 4 |" in md and "| tiny | new | unedited |" in md


def test_bench_quality_takes_a_split_and_a_skip_for_each_data_file(workspace, capsys):
    w, out = workspace, workspace / "bench2"
    data = [f"a={w / 'val.jsonl'}", f"b={w / 'val.jsonl'}"]
    assert main(["bench", "quality", "--model", str(w / "model"), "--methods", "ft", "--data", *data, "--split", "all",
                 "--skip", "0", "3", "--n", "2", "--facts-per-point", "2", "--targets", "new", "--no-generate",
                 "--ft-steps", "1", "--out", str(out)]) == 0
    held = {r["data"]: r["held_out_facts"] for r in json.loads((out / "results.json").read_text())["rows"]}
    assert held["a"] - held["b"] == 3
    assert main(["bench", "quality", "--model", str(w / "model"), "--methods", "ft", "--data", *data,
                 "--skip", "0", "1", "2", "--out", str(out / "x")]) == 2
    assert "--skip: give one value, or one for each of the 2 --data files" in capsys.readouterr().err
    assert not (out / "x").exists()
    assert main(["bench", "quality", "--model", str(w / "model"), "--methods", "ft", "--data", data[0],
                 "--skip", "3", "--n", "10000", "--out", str(out / "y")]) == 2
    assert "fewer than any --n" in capsys.readouterr().err and not (out / "y").exists()


def test_train_with_a_keys_shaped_regulariser_saves_it_and_learns_lambda(workspace, trained):
    """--regulariser keys --stats-data on a continued editor: trained through the shaped solve
    (its lambdas move), saved with the setting."""
    w = workspace
    before = json.loads((trained / "best" / "editor.json").read_text())["trainer"]["step"]
    assert main(["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
                 "--init-editor", str(trained / "best"), "--out", str(w / "shaped"), "--n-edits", "8",
                 "--steps", str(before + 2), "--val-every", "2", "--val-n", "8", "--lm-batch-size", "4",
                 "--regulariser", "keys", "--stats-data", str(w / "train.jsonl"), "--stats-texts", "80",
                 "--prior-mix", "0.5"]) == 0
    config = json.loads((w / "shaped" / "last" / "editor.json").read_text())["config"]
    assert config["regulariser"] == "keys" and config["prior_mix"] == 0.5
    from safetensors.torch import load_file
    old, new = load_file(trained / "best" / "editor.safetensors"), load_file(w / "shaped" / "last" / "editor.safetensors")
    lams = [k for k in new if "lam" in k]
    assert lams and any(not torch.equal(old[k], new[k]) for k in lams)


def test_train_widens_an_editors_rank_and_refuses_to_narrow_it(workspace, trained, capsys):
    w = workspace
    start = json.loads((trained / "best" / "editor.json").read_text())["trainer"]["step"]
    args = ["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
            "--init-editor", str(trained / "best"), "--n-edits", "8", "--val-every", "1", "--val-n", "8",
            "--lm-batch-size", "4", "--steps", str(start + 1)]
    assert main([*args, "--rank", "12", "--out", str(w / "wide")]) == 0
    meta = json.loads((w / "wide" / "last" / "editor.json").read_text())
    assert meta["config"]["hyper"]["rank"] == 12 and meta["widened"] == {"from_rank": 8, "to_rank": 12}
    assert main([*args, "--rank", "4", "--out", str(w / "narrow")]) == 2
    assert "an editor can only be widened" in capsys.readouterr().err and not (w / "narrow").exists()


def test_train_continues_from_an_editor(workspace, trained):
    w = workspace
    start = json.loads((trained / "best" / "editor.json").read_text())["trainer"]["step"]
    assert main(["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
                 "--init-editor", str(trained / "best"), "--out", str(w / "more"), "--n-edits", "8",
                 "--steps", str(start + 2), "--val-every", "2", "--val-n", "8", "--lm-batch-size", "4", "--c-loc", "3"]) == 0
    log = [json.loads(line) for line in open(w / "more" / "train_log.jsonl")]
    assert [r["step"] for r in log] == [start + 1, start + 2]
    meta = json.loads((w / "more" / "last" / "editor.json").read_text())
    assert meta["trainer"]["initialised_from"]["step"] == start and meta["trainer"]["train_config"]["c_loc"] == 3


def test_train_from_an_editor_keeps_its_provenance_as_the_parents(workspace, trained, tmp_path):
    import shutil

    w = workspace
    parent = tmp_path / "parent"
    shutil.copytree(trained / "best", parent)
    meta = json.loads((parent / "editor.json").read_text())
    meta["provenance"] = {"commands": ["malmen train --out parent"]}
    (parent / "editor.json").write_text(json.dumps(meta))
    assert main(["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
                 "--init-editor", str(parent), "--out", str(w / "child"), "--n-edits", "8",
                 "--steps", str(meta["trainer"]["step"] + 1), "--val-every", "1", "--val-n", "8", "--lm-batch-size", "4"]) == 0
    child = json.loads((w / "child" / "last" / "editor.json").read_text())
    assert "provenance" not in child
    assert child["commands"][:-1] == meta["commands"] and child["commands"][-1].startswith("malmen train ")
    assert f"--init-editor {parent}" in child["commands"][-1]
    assert child["trainer"]["initialised_from"]["provenance"] == {"commands": ["malmen train --out parent"]}


def test_train_moves_an_editor_to_other_layers(workspace, trained):
    w = workspace
    mods = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert main(["train", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--val-data", str(w / "val.jsonl"),
                 "--init-editor", str(trained / "best"), "--modules", *mods, "--eta-factor", "2",
                 "--out", str(w / "moved"), "--n-edits", "8", "--steps", "100", "--max-minutes", "0.001",
                 "--val-every", "1", "--val-n", "8", "--lm-batch-size", "4"]) == 0
    meta = json.loads((w / "moved" / "last" / "editor.json").read_text())
    assert meta["config"]["modules"] == mods and list(meta["shapes"]) == mods
    assert meta["transplanted"]["eta_factor"] == 2 and meta["transplanted"]["sources"][mods[0]] == mods[0]
    old = json.loads((trained / "best" / "editor.json").read_text())
    assert meta["config"]["hyper"] == old["config"]["hyper"]


def test_bench_speed_and_scale(workspace):
    w = workspace
    out = w / "speed.json"
    assert main(["bench", "speed", "--model", str(w / "model"), "--data", str(w / "train.jsonl"), "--no-split",
                 "--edit-facts", "16", "--train-n", "8", "--steps", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n_facts"] == 16 and r["device"] == "cpu" and [t["n_edits"] for t in r["train"]] == [8]
    assert r["edit_ratio"] == pytest.approx(r["edit_facts_per_s"] / r["limit_facts_per_s"])
    assert r["train_ratio"] == pytest.approx(r["train_step_s"] / r["train_step_bound_s"])
    out = w / "scale.json"
    assert main(["bench", "scale", "--model", str(w / "model"), "--n", "20", "200", "--lm-batch-size", "8",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [p["n"] for p in r["points"]] == [20, 200]
    assert r["rss_ratio"] == pytest.approx(r["points"][1]["peak_rss_mb"] / r["points"][0]["peak_rss_mb"])


def test_edit_dry_run_checks_estimates_and_writes_nothing(workspace, trained, capsys):
    w = workspace
    assert main(["edit", "--model", str(w / "model"), "--editor", str(trained / "best"), "--facts", str(w / "val.jsonl"),
                 "--out", str(w / "dry"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "dry run: 16 facts" in printed and "sums KᵀK/KᵀD" in printed and "estimated time" in printed
    assert "plus" in printed and "for the solve" in printed
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


def test_help_shows_defaults():
    r = run_cli("train", "--help")
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert r.returncode == 0 and "(default: 1000)" in text and "(default: 256, or the editor's)" in text
    assert "(default: smollm2-135m)" in text


def test_an_output_directory_the_command_did_not_write_is_refused_before_loading(tmp_path, capsys):
    """Outputs are replaced whole (atomically): a user's own directory given by mistake is refused,
    before the model loads, and keeps its files."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "The capital of France is", "target": "Lyon"}\n')
    edit = ["edit", "--model", str(tmp_path / "no-model"), "--editor", "smollm2-zsre", "--facts", str(facts)]
    for args, marker in (([*edit, "--out", str(mine)], "config.json"), ([*edit, "--patch-out", str(mine)], "patch.json"),
                         (["apply", str(tmp_path / "no-patch"), "--out", str(mine)], "config.json")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{mine}: exists and holds no {marker}" in err and "no-model" not in err and "no-patch" not in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_bench_quality_refuses_a_ppl_text_that_cannot_serve_before_the_model_is_loaded(trained, tmp_path):
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "a", "target": "b"}\n')
    (tmp_path / "empty.txt").write_text("\n")
    r = run_cli("bench", "quality", "--model", str(tmp_path / "no-model"), "--methods", f"malmen={trained / 'best'}",
                "--data", f"tiny={facts}", "--n", "1", "--ppl-text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip() == f"malmen: error: {tmp_path / 'empty.txt'}: holds no text", r.stderr
    assert not (tmp_path / "o").exists()


def test_bench_quality_refuses_bad_stats_data_before_the_model_is_loaded(trained, tmp_path):
    """bench quality --stats-data is checked like eval's: file, record and field named, exit 2,
    before the (here missing) model would load, nothing written."""
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "a", "target": "b"}\n')
    bad = tmp_path / "stats.jsonl"
    bad.write_text('{"prompt": "a", "target": "b", "locality_prompt": "c", "locality_answer": "d"}\n{"prompt": "c"}\n')
    r = run_cli("bench", "quality", "--model", str(tmp_path / "no-model"), "--methods", f"malmen={trained / 'best'}",
                "--data", f"tiny={facts}", "--n", "1", "--regulariser", "keys", "--stats-data", str(bad),
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "record 2: field 'target': missing" in r.stderr and "no-model" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--c-loc", "-1", "argument --c-loc: must be zero or positive, not -1"),
    ("--val-n", "0", "argument --val-n: must be at least 1, not 0"),
    ("--clip", "0", "argument --clip: must be positive, not 0"),
])
def test_train_refuses_a_setting_no_run_can_use_before_the_model_is_loaded(tmp_path, option, value, message):
    facts = tmp_path / "f.jsonl"
    facts.write_text('{"prompt": "a", "target": "b"}\n')
    r = run_cli("train", "--model", str(tmp_path / "no-model"), "--data", str(facts), option, value,
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and message in r.stderr.splitlines()[-1], r.stderr
    assert "no-model" not in r.stderr and not (tmp_path / "o").exists()
