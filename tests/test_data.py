"""Loaders on the real files, splits, the label firewall view, and bad input (one-line errors, exit code 2)."""

import gzip
import json
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from ser.data import Pair, hide_labels, load_pairs, load_records, load_unlabelled, pair_id, split_pairs
from ser.errors import UserError


def test_hh_rlhf_real_files_and_prompt_split(shared_data, caplog):
    caplog.set_level("INFO")
    pairs = load_pairs("hh-rlhf:helpful-base")
    # 2354 records, 4 with an empty final answer and 2 with identical answers are dropped, with a count
    assert len(pairs) == 2348
    assert "dropped 2 of 2354 records (identical answers)" in caplog.text
    raw = json.loads(gzip.open(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz", "rt").readline())
    p = pairs[0]
    assert p.prompt.endswith("\n\nAssistant:") and p.prompt.startswith("\n\nHuman:")
    assert "\n\nHuman:" not in p.chosen and p.prompt + " " + p.chosen == raw["chosen"]
    assert p.prompt + " " + p.rejected == raw["rejected"]
    assert len(load_pairs("hh-rlhf:harmless-base")) == 2308
    assert len(load_pairs("hh-rlhf:helpful-online")) == 1132
    assert len(load_pairs(str(shared_data / "hh-rlhf/helpful-online/test.jsonl.gz"))) == 1132


def test_ultrafeedback_and_pandalm(shared_data, caplog):
    caplog.set_level("INFO")
    # 994 usable pairs, of which 110 (and 24 of the 199 eval pairs) are ties (score_chosen == score_rejected): dropped
    assert len(load_pairs("ultrafeedback")) == 884 and len(load_pairs("ultrafeedback:eval")) == 175
    assert "dropped 111 of 1000 records (tie: score_chosen == score_rejected)" in caplog.text
    assert len(load_pairs("ultrafeedback", drop_ties=False)) == 994
    pandalm = load_pairs("pandalm")
    assert "tie or no majority among annotators" in caplog.text
    assert len(pandalm) == 762
    raw = json.loads((shared_data / "pandalm/testset-v1.json").read_text())
    # record 0: all three annotators chose response2
    first = raw[0]
    p = next(x for x in pandalm if x.prompt == first["instruction"] + "\n\n" + first["input"])
    assert (p.chosen, p.rejected) == (first["response2"], first["response1"])


def test_column_mapping_csv_and_jsonl(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("input,output_1,output_2,label\nq1,a good,a bad,0\nq2,b bad,b good,1\n")
    cols = {"prompt": "input", "answer_a": "output_1", "answer_b": "output_2", "label": "label"}
    pairs = load_pairs(str(f), columns=cols)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("q1", "a good", "a bad"), ("q2", "b good", "b bad")]
    g = tmp_path / "y.jsonl"
    g.write_text(json.dumps({"q": "Q", "good": "G", "bad": "B"}) + "\n")
    assert load_pairs(str(g), columns={"prompt": "q", "chosen": "good", "rejected": "bad"})[0].chosen == "G"


def test_a_files_own_label_column_beside_two_answers_labels_the_pair(tmp_path):
    """prompt/answer_a/answer_b with the file's own `label` (0 = answer_a better) is labelled without a column
    mapping (it read as unlabelled: train-rm said "no labels", score wrote r_a/r_b); a null label stays unlabelled."""
    f = tmp_path / "l.jsonl"
    f.write_text(json.dumps({"prompt": "q1", "answer_a": "x", "answer_b": "y", "label": 1}) + "\n"
                 + json.dumps({"prompt": "q2", "answer_a": "u", "answer_b": "v", "label": "0"}) + "\n")
    assert [(p.prompt, p.chosen, p.rejected) for p in load_pairs(str(f))] == [("q1", "y", "x"), ("q2", "u", "v")]
    g = tmp_path / "n.jsonl"  # the usual ways of saying "no label" leave the pair unlabelled, as before
    g.write_text("".join(json.dumps({"prompt": f"q{i}", "answer_a": "x", "answer_b": "y", "label": v}) + "\n"
                         for i, v in enumerate([None, "", -1, "-1", float("nan")])))
    assert [(u.prompt, u.answer_a, u.answer_b) for u in load_unlabelled(str(g))] == [(f"q{i}", "x", "y")
                                                                                    for i in range(5)]
    c = tmp_path / "n.csv"
    c.write_text("prompt,answer_a,answer_b,label\nq,x,y,\n")
    assert len(load_unlabelled(str(c))) == 1
    h = tmp_path / "bad.jsonl"
    h.write_text(json.dumps({"prompt": "q", "answer_a": "x", "answer_b": "y", "label": 2}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: label must be 0 or 1 .* got 2"):
        load_pairs(str(h))


def test_a_prompt_repeated_inside_its_answers_is_read_once(tmp_path):
    """A prompt given beside answers that already begin with it (whole conversations, or HH-RLHF dialogues with a
    prompt column added) was read twice: 'Human: hi ... Human: hi ... Assistant:'."""
    hi = [{"role": "user", "content": "hi"}]
    rec = {"prompt": hi, "chosen": hi + [{"role": "assistant", "content": "hello"}],
           "rejected": hi + [{"role": "assistant", "content": "go"}]}
    prompt = "\n\nHuman: hi\n\nAssistant:"
    text = {"prompt": prompt, "chosen": prompt + " hello", "rejected": prompt + " go"}
    short = {"prompt": "Hi", "chosen": "Hi there", "rejected": "Hi, go"}  # no dialogue: answers kept whole
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in (rec, text, short)))
    loaded = load_records(str(f))
    # the first two are one pair read from two formats (a duplicate, so left out once)
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded.pairs] == [(prompt, "hello", "go"),
                                                                        ("Hi", "Hi there", "Hi, go")]
    assert [s["reason"] for s in loaded.skipped] == ["duplicate"]


def test_conversational_format_with_and_without_chat_template(tmp_path):
    rec = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    p = load_pairs(str(f))[0]
    assert (p.prompt, p.chosen, p.rejected) == ("\n\nHuman: hi\n\nAssistant:", "hello!", "go away")
    p = load_pairs(str(f), chat_template=lambda msgs: "<|user|>" + msgs[0]["content"] + "<|assistant|>")[0]
    assert p.prompt == "<|user|>hi<|assistant|>"


def test_unlabelled_file_and_hide_labels(tmp_path, shared_data):
    f = tmp_path / "u.jsonl"
    f.write_text(json.dumps({"prompt": "q", "answer_a": "x", "answer_b": "y"}) + "\n")
    u = load_unlabelled(str(f))
    assert (u[0].answer_a, u[0].answer_b) == ("x", "y")
    with pytest.raises(UserError, match="has no labels"):
        load_pairs(str(f))
    pairs = load_pairs("hh-rlhf:helpful-base", limit=400)
    pool, truth = hide_labels(pairs)
    assert pool == hide_labels(pairs)[0]  # deterministic
    assert 120 < sum(truth.values()) < 280  # answer order does not reveal the label
    for p, u in zip(pairs, pool):
        assert (u.answer_a if truth[u.id] == 0 else u.answer_b) == p.chosen
    # ids ignore which answer is chosen, so flipping a label changes neither the id nor the unlabelled view
    flipped = [Pair(p.id, p.prompt, p.rejected, p.chosen, p.source) for p in pairs]
    assert hide_labels(flipped)[0] == pool and pair_id("q", "a", "b") == pair_id("q", "b", "a")


def _pairs(n):
    return [Pair(pair_id(f"q{i}", "a", "b"), f"q{i}", "a", "b", "t") for i in range(n)]


def test_split_sizes_disjoint_and_stable():
    pairs = _pairs(100)
    s = split_pairs(pairs, seed_size=0.15, test_size=20, seed=0)
    assert (len(s.seed), len(s.pool), len(s.test)) == (15, 65, 20)
    ids = [p.id for p in s.seed + s.pool + s.test]
    assert len(set(ids)) == 100
    shuffled = pairs[:]
    random.Random(1).shuffle(shuffled)
    t = split_pairs(shuffled, seed_size=0.15, test_size=20, seed=0)
    assert [p.id for p in t.seed] == [p.id for p in s.seed] and [p.id for p in t.test] == [p.id for p in s.test]
    assert {p.id for p in split_pairs(pairs, seed_size=0.15, test_size=20, seed=1).seed} != {p.id for p in s.seed}
    assert len(split_pairs(pairs, seed_size=10, test_size=10, pool_size=30).pool) == 30
    with pytest.raises(UserError, match="only 100 usable pairs"):
        split_pairs(pairs, seed_size=90, test_size=20)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 60), st.integers(0, 10), st.floats(0, 0.5), st.integers(0, 5))
def test_split_properties(n, n_test, frac, seed):
    pairs = _pairs(n)
    n_test = min(n_test, n - round(frac * n))  # asking for more than exists is an error (tested above)
    s = split_pairs(pairs, seed_size=frac, test_size=n_test, seed=seed)
    parts = [{p.id for p in x} for x in (s.seed, s.pool, s.test)]
    assert sum(map(len, parts)) == n and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    r = split_pairs(pairs[::-1], seed_size=frac, test_size=n_test, seed=seed)
    assert [p.id for p in r.seed] == [p.id for p in s.seed]


HH = '{"chosen": "\\n\\nHuman: q\\n\\nAssistant: good", "rejected": "\\n\\nHuman: q\\n\\nAssistant: bad"}\n'
BAD = [
    ("bad.jsonl", HH + '{"chosen": "x", \n', "bad.jsonl:2: malformed JSON"),
    ("trunc.jsonl.gz", None, "truncated or corrupt gzip"),
    ("utf.jsonl", b'{"chosen": "\xff\xfe"}\n', "utf.jsonl:1: invalid UTF-8"),
    ("empty.jsonl", "", "no records (empty file)"),
    ("missing.jsonl", '{"prompt": "q", "chosen": "a"}\n', "unrecognised record format"),
    ("type.jsonl", '{"prompt": "q", "chosen": 3, "rejected": "b"}\n', "type.jsonl:1: field 'chosen' is int, expected a string"),
    ("num.jsonl", "42\n", "num.jsonl:1: expected a JSON object, got int"),
    ("same.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "a"}\n', "no usable pairs"),
    ("role.jsonl", json.dumps({"chosen": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "b"}]}) + "\n",
     "unknown chat role 'wizard'"),
    ("votes.json", json.dumps([{"instruction": "i", "response1": "a", "response2": "b", "annotator1": 7,
                                "annotator2": 1, "annotator3": 1}]), "votes.json:0: 'annotator1' must be 0, 1 or 2"),
    ("prefix.jsonl", '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: x", "rejected": "\\n\\nHuman: b\\n\\nAssistant: y"}\n',
     "do not share a prefix"),
    # a user's text in the message is cut (shown): one readable line, not 100,000 characters or a line break
    ("bigrole.jsonl", json.dumps({k: [{"role": "w\n" * 50_000, "content": "hi"}, {"role": "assistant", "content": k}]
                                  for k in ("chosen", "rejected")}) + "\n", "unknown chat role 'w\\nw\\n"),
    ("bigkey.jsonl", json.dumps({"k" * 100_000: 1, "x\ny": 2}) + "\n", "(fields: 'kkkk"),
    ("twice.jsonl", '{"' + "k" * 100_000 + '": 1, "' + "k" * 100_000 + '": 2}\n', "key 'kkkk"),
]


@pytest.mark.parametrize("name, content, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gives_one_line_error(tmp_path, name, content, needle):
    f = tmp_path / name
    if content is None:
        f.write_bytes(gzip.compress((HH * 50).encode())[:-30])
    else:
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as e:
        load_pairs(str(f))
    msg = str(e.value)
    assert needle in msg and name in msg and "\n" not in msg and len(msg) < 1000


def test_unknown_dataset_and_missing_file():
    with pytest.raises(UserError, match="unknown dataset.*known datasets: hh-rlhf:helpful-base"):
        load_pairs("hh-rlhf:nonsense-base")
    with pytest.raises(UserError, match="no such file"):
        load_pairs("/nonexistent/data.jsonl")


def test_cli_bad_data_exit_code_2_no_traceback_nothing_written(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(HH + "{oops\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "ser", "train-rm", "--out", str(out), f"--data.train={f}"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == f"error: {f}:2: malformed JSON (Expecting property name enclosed in double quotes)"
    assert "Traceback" not in p.stderr and not out.exists()
    p = subprocess.run([sys.executable, "-m", "ser", "train-rm", "--out", str(out), "--train.lrr=1"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "unknown config key 'train.lrr'" in p.stderr and not out.exists()
