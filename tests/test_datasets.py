import itertools
import json
from pathlib import Path

import pytest

from malmen.datasets import load_facts
from malmen.datasets.zsre import split_of
from malmen.facts import Fact, FactError

FIX = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_zsre_both_conventions():
    mend = list(load_facts(FIX / "zsre_mend.json"))
    assert mend[0] == Fact(prompt="What is the product made by UniFirst?", target="unmanned aircraft",
                           rephrases=("What will be the product of UniFirst?",),
                           locality_prompt="nq question: john goodman's character in the big lebowski",
                           locality_answer="Walter Sobchak", subject="UniFirst", true_answer="uniform")
    assert list(load_facts(FIX / "zsre_mend.json", target="true"))[0].target == "uniform"
    easy = list(load_facts(FIX / "zsre_easyedit.json"))
    assert easy[0].prompt == "What university did Watts Humphrey attend?"
    assert easy[0].target == "University of Michigan"
    assert easy[0].rephrases[0] == "What university did Watts Humphrey take part in?"
    assert len(easy[0].rephrases) == 3  # headline rephrase + similar prompts
    assert easy[0].uid == "0" and easy[0].true_answer == "Illinois Institute of Technology"


def test_counterfact_and_user_facts():
    cf = list(load_facts(FIX / "counterfact.json"))
    assert cf[0].prompt == "BBC One, by" and cf[0].target == "Sega" and cf[0].locality_answer == "BBC"
    rome = list(load_facts(FIX / "counterfact_rome.json", target="true"))
    assert rome[0].prompt == "The mother tongue of Danielle Darrieux is" and rome[0].target == "French"
    user = list(load_facts(FIX / "facts.jsonl"))
    assert [f.target for f in user] == ["Sylvania City", "Wile E. Coyote"]
    assert user[1].rephrases == () and not user[1].has_locality


def test_split_is_fixed_and_disjoint():
    facts = [Fact(prompt=f"p{i}", target="t", uid=str(i)) for i in range(100)]
    parts = {name: [int(f.uid) for f in facts if split_of(f) == name] for name in ("train", "val", "test")}
    assert parts["val"] == list(range(0, 100, 10))
    assert parts["test"] == [i for i in range(100) if i % 10 in (1, 2, 3)]
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == list(range(100))
    # without a case_id, the SHA-1 of the prompt decides, the same way every time
    assert [split_of(Fact(prompt=f"q{i}", target="t")) for i in range(50)] == \
        [split_of(Fact(prompt=f"q{i}", target="x")) for i in range(50)]
    if (SHARED / "zsre" / "zsre_mend_eval_with_subject.json").is_file():
        path = SHARED / "zsre" / "zsre_mend_eval_with_subject.json"
        uids = {name: {f.uid for f in load_facts(path, split=name)} for name in ("train", "val", "test")}
        assert all(int(u) % 10 == 0 for u in uids["val"]) and all(int(u) % 10 in (1, 2, 3) for u in uids["test"])
        assert len(uids["test"]) >= 4096  # n = 4,096 can be measured on held-out facts
        assert not (uids["train"] & uids["val"] or uids["train"] & uids["test"] or uids["val"] & uids["test"])


BAD = [
    ("truncated.json", '[{"prompt": "a", "target": "b"}', None, None, "invalid JSON"),
    ("bad.jsonl", '{"prompt": "a", "target": "b"}\n{"prompt": "a" "target"}\n', 2, None, "invalid JSON"),
    ("type.jsonl", '{"prompt": 3, "target": "b"}\n', 1, "prompt", "expected a string"),
    ("missing.jsonl", '{"prompt": "a", "target": "b"}\n{"prompt": "a", "target": null, "x": 1}\n', 2, "target", "missing"),
    ("empty_field.jsonl", '{"prompt": "  ", "target": "b"}\n', 1, "prompt", "empty"),
    ("empty.jsonl", "\n\n", None, None, "no facts"),
    ("notobj.jsonl", '["prompt", "target"]\n', 1, None, "JSON object"),
    ("unknown.jsonl", '{"question": "a", "answer": "b"}\n', 1, None, "unknown fact format"),
    ("rephrase.jsonl", '{"prompt": "a", "target": "b", "rephrases": ["x", 2]}\n', 1, "rephrases[1]", "non-empty string"),
    ("loc.jsonl", '{"prompt": "a", "target": "b", "locality_prompt": "c"}\n', 1, "locality_answer", "missing"),
    ("zsre.json", json.dumps([{"src": "a", "alt": "b", "answers": [], "rephrase": "c", "loc": "d", "loc_ans": "e"}]), 1, "answers", "empty list"),
    # the first record lacks its target: named as the missing field, not as an unknown format
    ("first.jsonl", '{"prompt": "a"}\n{"prompt": "c", "target": "d"}\n', 1, "target", "missing"),
    ("src_only.json", json.dumps([{"src": "a", "answers": ["x"]}]), 1, "alt", "missing"),
]


@pytest.mark.parametrize("name,text,record,field,reason", BAD)
def test_malformed_input_names_file_record_field(tmp_path, name, text, record, field, reason):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(FactError) as info:
        list(load_facts(path))
    err = info.value  # records count from 1, as a person counts lines
    assert err.source == str(path) and err.record == record and err.field == field
    assert reason in str(err) and "\n" not in str(err)


def test_non_utf8_and_missing_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "target": "b"}\n')
    with pytest.raises(FactError, match="UTF-8"):
        list(load_facts(path))
    with pytest.raises(FactError, match="cannot open"):
        list(load_facts(tmp_path / "nope.jsonl"))


def test_jsonl_is_streamed(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"prompt": "a", "target": "b"}\n' * 3 + "not json\n")
    stream = load_facts(path)
    assert next(stream).prompt == "a"  # records before a bad line are served lazily
    with pytest.raises(FactError):
        list(stream)


def test_fever_format(tmp_path):
    facts = list(load_facts(FIX / "fever.json"))
    assert [f.target for f in facts] == ["REFUTES", "SUPPORTS", "REFUTES"]
    assert facts[0].rephrases == ("France has Paris as its capital.", "The French capital is Paris.")
    assert facts[0].locality_prompt == "Tokyo is in Japan." and facts[0].locality_answer == "SUPPORTS"
    assert [f.target for f in load_facts(FIX / "fever.json", target="true")] == ["SUPPORTS", "REFUTES", "SUPPORTS"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "equiv_prompt": ["b"], "alt": "SUPPORTS", "unrel_prompt": "c", "unrel_ans": "REFUTES"}\n'
                   '{"prompt": "a", "equiv_prompt": ["b"], "alt": "MAYBE", "unrel_prompt": "c", "unrel_ans": "REFUTES"}\n')
    with pytest.raises(FactError, match=r"bad.jsonl: record 2: field 'alt': verdict 'MAYBE'"):
        list(load_facts(bad))
    bad.write_text('{"prompt": "a", "alt": "SUPPORTS", "equiv_prompt": [], "unrel_prompt": "c", "unrel_ans": "REFUTES"}\n')
    with pytest.raises(FactError, match="equiv_prompt"):
        list(load_facts(bad))


def test_counterfact_claims_flip_verdicts_both_ways():
    path = FIX / "counterfact_val_128_160.json"
    facts = list(itertools.islice(load_facts(path, fmt="counterfact-claims"), 4))
    plain = list(itertools.islice(load_facts(path), 4))
    assert [f.target for f in facts] == ["SUPPORTS", "REFUTES"] * 2
    assert facts[0].prompt == f"{plain[0].prompt} {plain[0].target}"
    assert facts[1].prompt == f"{plain[1].prompt} {plain[1].true_answer}"
    assert facts[0].rephrases[0].endswith(plain[0].target) and facts[0].locality_answer == "SUPPORTS"
    # never detected automatically
    assert list(itertools.islice(load_facts(path), 1))[0].target == plain[0].target
