"""Loaders on the real files, column mapping and formats, splits, the label firewall view, and bad input
(one-line errors that name the file and the problem)."""

import gzip
import json
import random
import subprocess
import sys
import time
from importlib.util import find_spec

import pytest
from hypothesis import given, settings, strategies as st

from ser.data import (Pair, dedupe, hide_labels, load_pairs, load_unlabelled, pair_id, resolve_data_spec,
                      split_pairs)
from ser.errors import UserError

# ---------------------------------------------------------------- the real files in ../shared/data

HH_COUNTS = {  # spec: (records, pairs kept, drop lines logged) -- measured on the shared files
    "hh-rlhf:helpful-base": (2354, 2348, ["dropped 4 of 2354 pairs (empty chosen or rejected)",
                                          "dropped 2 of 2354 pairs (identical chosen and rejected)"]),
    "hh-rlhf:harmless-base": (2312, 2308, ["dropped 4 of 2312 pairs (empty chosen or rejected)"]),
    "hh-rlhf:helpful-online": (1137, 1132, ["dropped 3 of 1137 pairs (empty chosen or rejected)",
                                            "dropped 2 of 1137 pairs (identical chosen and rejected)"]),
}


def raw_lines(path):
    return [json.loads(line) for line in gzip.open(path, "rt")]


@pytest.mark.parametrize("spec", HH_COUNTS)
def test_hh_rlhf_counts_drops_and_prompt_split(shared_data, caplog, spec):
    caplog.set_level("INFO", logger="ser.data")
    records, kept, drop_lines = HH_COUNTS[spec]
    pairs = load_pairs(spec)
    assert len(pairs) == kept
    for line in drop_lines:
        assert f"{spec}: {line}" in caplog.text
    assert {p.source for p in pairs} == {spec}
    path = resolve_data_spec(spec)
    assert path == str(shared_data / "hh-rlhf" / spec.split(":")[1] / "test.jsonl.gz")
    raw = raw_lines(path)
    assert len(raw) == records
    # Every pair is its raw record split at the shared '\n\nAssistant:', minus the one space after it.
    originals = {(r["chosen"], r["rejected"]) for r in raw}
    for p in pairs:
        assert p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:")
        assert (p.prompt + " " + p.chosen, p.prompt + " " + p.rejected) in originals
    assert load_pairs(path) == [Pair(p.id, p.prompt, p.chosen, p.rejected, "test") for p in pairs]  # by path


def test_hh_rlhf_first_record_and_hallucinated_turns(shared_data):
    pairs = load_pairs("hh-rlhf:helpful-base")
    raw = raw_lines(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz")
    p = pairs[0]
    assert "\n\nHuman:" not in p.chosen and p.prompt + " " + p.chosen == raw[0]["chosen"]
    assert p.prompt == raw[0]["chosen"][: raw[0]["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")]
    # Line 169: the rejected answer invents a "Humans:" turn and a second '\n\nAssistant:', so the two last
    # Assistant turns differ; the prompt is the common prefix up to the first (and only shared) one.
    r = raw[168]
    p = next(x for x in pairs if x.prompt + " " + x.chosen == r["chosen"])
    assert p.prompt == "\n\nHuman: What are some famous world music artists?\n\nAssistant:"
    assert p.rejected.startswith("A complete list would be quite long")
    assert "\n\nHumans: That’s fine, how about the first ten?\n\nAssistant: Alright" in p.rejected
    assert p.prompt + " " + p.rejected == r["rejected"]


def test_hh_answer_loses_only_its_leading_space(tmp_path):
    f = write(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: q\n\nAssistant: good \n", "rejected": "\n\nHuman: q\n\nAssistant:  bad"}])
    p = load_pairs(f)[0]
    assert (p.prompt, p.chosen, p.rejected) == ("\n\nHuman: q\n\nAssistant:", "good \n", "bad")


def test_helpful_base_loads_fast(shared_data):
    start = time.perf_counter()
    assert len(load_pairs("hh-rlhf:helpful-base")) == 2348
    assert time.perf_counter() - start < 1.0  # about 0.07 s measured


def test_ultrafeedback_train_and_eval(shared_data, caplog):
    caplog.set_level("INFO", logger="ser.data")
    train, eval_ = load_pairs("ultrafeedback"), load_pairs("ultrafeedback:eval")
    assert (len(train), len(eval_)) == (994, 199)
    assert load_pairs("ultrafeedback:train") == train
    assert "ultrafeedback: dropped 2 of 1000 pairs (empty chosen or rejected)" in caplog.text
    assert "ultrafeedback: dropped 4 of 1000 pairs (identical chosen and rejected)" in caplog.text
    assert "ultrafeedback:eval: dropped 1 of 200 pairs (identical chosen and rejected)" in caplog.text
    first = json.loads((shared_data / "ultrafeedback-binarized-subset/train_clean.jsonl").open().readline())
    assert (train[0].prompt, train[0].chosen, train[0].rejected) == (first["prompt"], first["chosen"], first["rejected"])
    assert not {p.id for p in train} & {p.id for p in eval_}


def test_pandalm_majority_and_drops(shared_data, caplog):
    caplog.set_level("INFO", logger="ser.data")
    pairs = load_pairs("pandalm")
    # 999 records: 105 majority ties, 52 with an empty response, 80 repeats of an identical comparison
    # (different models, same outputs, same votes) -> 762
    assert len(pairs) == 762
    for line in ("dropped 105 of 999 pairs (annotators' majority is a tie)",
                 "dropped 52 of 999 pairs (empty chosen or rejected)", "dropped 80 of 999 pairs (duplicate)"):
        assert f"pandalm: {line}" in caplog.text
    raw = json.loads((shared_data / "pandalm/testset-v1.json").read_text())
    by_prompt_answers = {(p.prompt, p.chosen, p.rejected) for p in pairs}

    def prompt(r):
        return r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")

    r = raw[0]  # votes 2, 2, 2
    assert (prompt(r), r["response2"], r["response1"]) in by_prompt_answers
    r = raw[112]  # votes 1, 1, 0 and an empty input: the prompt is the instruction alone
    assert r["input"] == "" and (r["instruction"], r["response1"], r["response2"]) in by_prompt_answers
    r = raw[119]  # votes 2, 0, 2
    assert (prompt(r), r["response2"], r["response1"]) in by_prompt_answers
    r = raw[157]  # votes 1, 1, 0; response1 is the JSON boolean true in the release
    assert r["response1"] is True and (prompt(r), "True", "True.") in by_prompt_answers


def test_unlabelled_view_of_labelled_data_and_limit(shared_data):
    pairs = load_pairs("hh-rlhf:helpful-online")
    pool = load_unlabelled("hh-rlhf:helpful-online")
    assert [u.id for u in pool] == [p.id for p in pairs] and pool == hide_labels(pairs)[0]
    assert 0.4 < sum(u.answer_a == p.chosen for u, p in zip(pool, pairs)) / len(pairs) < 0.6
    assert load_pairs("hh-rlhf:helpful-online", limit=16) == pairs[:16]
    assert load_unlabelled("pandalm", limit=5) == load_unlabelled("pandalm")[:5]


def test_data_dir_resolution(tmp_path, monkeypatch, shared_data):
    local = tmp_path / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    local.parent.mkdir(parents=True)
    local.write_bytes(gzip.compress(HH.encode()))
    monkeypatch.setenv("SER_DATA_DIR", str(tmp_path))  # $SER_DATA_DIR comes before ../shared/data
    assert resolve_data_spec("hh-rlhf:helpful-base") == str(local)
    assert [p.chosen for p in load_pairs("hh-rlhf:helpful-base")] == ["good"]
    monkeypatch.delenv("SER_DATA_DIR")
    assert resolve_data_spec("hh-rlhf:helpful-base:test") == str(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz")
    with pytest.raises(UserError) as e:  # only the test split is local, and the Hub is off in tests
        load_pairs("hh-rlhf:helpful-base:train")
    msg = str(e.value)
    assert msg.startswith("hh-rlhf:helpful-base:train: not found locally (looked at ")
    assert str(shared_data / "hh-rlhf/helpful-base/train.jsonl.gz") in msg and "HF_HUB_OFFLINE=1" in msg
    with pytest.raises(UserError, match="unknown split 'validation' of ultrafeedback \\(known: train, eval\\)"):
        load_pairs("ultrafeedback:validation")


# ---------------------------------------------------------------- formats and column mapping


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_column_mapping_csv_and_jsonl(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text('input,output_1,output_2,label\nq1,a good,a bad,0\n"q2, with\na newline",b bad,b good,1\n')
    cols = {"prompt": "input", "answer_a": "output_1", "answer_b": "output_2", "label": "label"}
    pairs = load_pairs(str(f), columns=cols)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("q1", "a good", "a bad"),
                                                                  ("q2, with\na newline", "b good", "b bad")]
    assert pairs[0].source == "x"
    # labels that are only 1 and 2 mean output_1 / output_2
    g = tmp_path / "y.csv"
    g.write_text("input,output_1,output_2,label\nq1,a good,a bad,1\nq2,b bad,b good,2\n")
    assert [p.chosen for p in load_pairs(str(g), columns=cols)] == ["a good", "b good"]
    h = write(tmp_path / "z.jsonl", [{"q": "Q", "good": "G", "bad": "B"}])
    p = load_pairs(h, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})[0]
    assert (p.prompt, p.chosen, p.rejected, p.source) == ("Q", "G", "B", "z")
    # a partial mapping: unmapped fields keep their own names
    k = write(tmp_path / "k.jsonl", [{"question": "Q", "chosen": "G", "rejected": "B"}])
    assert load_pairs(k, columns={"prompt": "question"})[0].prompt == "Q"
    with pytest.raises(UserError, match="z.jsonl:1: missing column 'good2' \\(mapped to 'chosen'"):
        load_pairs(h, columns={"prompt": "q", "chosen": "good2", "rejected": "bad"})
    with pytest.raises(UserError, match="unknown field\\(s\\) answer"):
        load_pairs(h, columns={"answer": "good"})
    m = tmp_path / "m.csv"
    m.write_text("input,output_1,output_2,label\nq1,a,b,0\nq2,c,d,2\n")
    with pytest.raises(UserError, match="m.csv: 'label' mixes 0 and 2"):
        load_pairs(str(m), columns=cols)


CHAT = {"chosen": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello!"}],
        "rejected": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "go away"}]}


def test_conversational_format_with_and_without_chat_template(tmp_path):
    f = write(tmp_path / "c.jsonl", [CHAT])
    p = load_pairs(f)[0]
    assert (p.prompt, p.chosen, p.rejected) == ("\n\nSystem: be kind\n\nHuman: hi\n\nAssistant:", "hello!", "go away")
    seen = []

    def template(msgs):
        seen.append(msgs)
        return "".join(f"<|{m['role']}|>{m['content']}" for m in msgs) + "<|assistant|>"

    p = load_pairs(f, chat_template=template)[0]
    assert p.prompt == "<|system|>be kind<|user|>hi<|assistant|>" and p.chosen == "hello!"
    assert seen == [CHAT["chosen"][:2]]
    # explicit prompt messages with answer-only chosen/rejected (TRL), and a string prompt (UltraFeedback raw)
    g = write(tmp_path / "d.jsonl", [{"prompt": [{"role": "user", "content": "hi"}],
                                      "chosen": [{"role": "assistant", "content": "A"}],
                                      "rejected": [{"role": "assistant", "content": "B"}]},
                                     {"prompt": "yo", "chosen": [{"role": "assistant", "content": "C"}],
                                      "rejected": [{"role": "assistant", "content": "D"}]}])
    assert [(p.prompt, p.chosen) for p in load_pairs(g)] == [("\n\nHuman: hi\n\nAssistant:", "A"),
                                                              ("\n\nHuman: yo\n\nAssistant:", "C")]


def test_json_list_data_key_and_jsonl_in_json(tmp_path):
    recs = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q2", "chosen": "c", "rejected": "d"}]
    (tmp_path / "list.json").write_text(json.dumps(recs))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": recs}))
    write(tmp_path / "lines.json", recs)
    expected = [("q", "a", "b"), ("q2", "c", "d")]
    for name in ("list.json", "wrapped.json", "lines.json"):
        assert [(p.prompt, p.chosen, p.rejected) for p in load_pairs(str(tmp_path / name))] == expected


def test_unlabelled_file(tmp_path):
    f = write(tmp_path / "u.jsonl", [{"prompt": "q", "answer_a": "x", "answer_b": "y"},
                                     {"prompt": "q", "answer_a": "y", "answer_b": "x"}])  # a duplicate
    u = load_unlabelled(f)
    assert [(x.answer_a, x.answer_b) for x in u] == [("x", "y")] and u[0].id == pair_id("q", "x", "y")
    with pytest.raises(UserError, match="u.jsonl:1: the file has no labels"):
        load_pairs(f)


def test_identical_and_empty_answers_are_counted_drops(tmp_path, caplog):
    caplog.set_level("INFO", logger="ser.data")
    f = write(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                     {"prompt": "q", "chosen": "same", "rejected": "same"},
                                     {"prompt": "q", "chosen": "", "rejected": "b"},
                                     {"prompt": "q", "chosen": "b", "rejected": "a"}])
    assert [p.chosen for p in load_pairs(f)] == ["a"]
    for line in ("d: dropped 1 of 4 pairs (identical chosen and rejected)",
                 "d: dropped 1 of 4 pairs (empty chosen or rejected)",
                 "d: dropped 1 of 4 pairs (duplicate with the opposite label)"):
        assert line in caplog.text


@pytest.mark.skipif(find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_is_a_clear_error(tmp_path):
    f = tmp_path / "x.parquet"
    f.write_bytes(b"PAR1")
    with pytest.raises(UserError, match="x.parquet: reading parquet needs pyarrow"):
        load_pairs(str(f))


@pytest.mark.skipif(find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_id_without_datasets_is_a_clear_error():
    with pytest.raises(UserError, match="someone/prefs: not a local file; loading someone/prefs from the Hugging "
                                        "Face Hub needs the `datasets` package"):
        load_pairs("someone/prefs")


# ---------------------------------------------------------------- the firewall and splits


def synthetic(n):
    return [Pair(pair_id(f"q{i}", f"good {i}", f"bad {i}"), f"q{i}", f"good {i}", f"bad {i}", "t") for i in range(n)]


def test_hide_labels_deterministic_balanced_and_label_blind():
    pairs = synthetic(1000)
    pool, truth = hide_labels(pairs)
    assert hide_labels(pairs) == (pool, truth)
    assert 430 < sum(truth.values()) < 570  # chosen is answer_a about half the time
    for p, u in zip(pairs, pool):
        assert (u.id, u.prompt) == (p.id, p.prompt) and (u.answer_a, u.answer_b)[truth[u.id]] == p.chosen
    # the view depends on neither the label nor the input order: flipping every label changes only `truth`
    flipped = [Pair(p.id, p.prompt, p.rejected, p.chosen, p.source) for p in pairs]
    f_pool, f_truth = hide_labels(flipped[::-1])
    assert f_pool == pool[::-1] and all(f_truth[i] == 1 - truth[i] for i in truth)


def test_split_sizes_disjoint_deterministic_and_stable(caplog):
    pairs = synthetic(100)
    s = split_pairs(pairs, seed_size=0.15, test_size=20, seed=0)
    assert (len(s.seed), len(s.pool), len(s.test)) == (15, 65, 20)
    parts = [{p.id for p in x} for x in (s.seed, s.pool, s.test)]
    assert sum(map(len, parts)) == len(set.union(*parts)) == 100
    assert split_pairs(pairs, seed_size=0.15, test_size=20, seed=0) == s
    shuffled = pairs[:]
    random.Random(1).shuffle(shuffled)
    assert split_pairs(shuffled, seed_size=0.15, test_size=20, seed=0) == s
    other = split_pairs(pairs, seed_size=0.15, test_size=20, seed=1)
    assert {p.id for p in other.seed} != parts[0] and {p.id for p in other.test} != parts[2]
    t = split_pairs(pairs, seed_size=10, test_size=0.1, pool_size=0.3)
    assert (len(t.seed), len(t.pool), len(t.test)) == (10, 30, 10)
    assert split_pairs(pairs + pairs[:7], seed_size=0.15, test_size=20) == s  # duplicates removed first
    assert "dropped 7 of 107 pairs as duplicates" in caplog.text
    with pytest.raises(UserError, match="asked for 20 test \\+ 90 seed \\+ 0 pool = 110 pairs, but only 100"):
        split_pairs(pairs, seed_size=90, test_size=20)
    with pytest.raises(UserError, match="'seed_size' as a fraction must be in \\[0, 1\\], got 1.5"):
        split_pairs(pairs, seed_size=1.5, test_size=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 80), st.integers(0, 20), st.floats(0, 0.6), st.one_of(st.none(), st.integers(0, 30)),
       st.integers(0, 5), st.randoms(use_true_random=False))
def test_split_properties(n, n_test, frac, pool_size, seed, rng):
    pairs = synthetic(n)
    n_seed = int(frac * n + 0.5)
    if n_test + n_seed + (pool_size or 0) > n:
        with pytest.raises(UserError, match=f"but only {n} unique pairs exist"):
            split_pairs(pairs, seed_size=frac, test_size=n_test, pool_size=pool_size, seed=seed)
        return
    s = split_pairs(pairs, seed_size=frac, test_size=n_test, pool_size=pool_size, seed=seed)
    parts = [{p.id for p in x} for x in (s.seed, s.pool, s.test)]
    assert (len(s.seed), len(s.test)) == (n_seed, n_test)
    assert len(s.pool) == (n - n_test - n_seed if pool_size is None else pool_size)
    assert sum(map(len, parts)) == len(set.union(*parts))  # disjoint
    rng.shuffle(pairs)
    assert split_pairs(pairs, seed_size=frac, test_size=n_test, pool_size=pool_size, seed=seed) == s


def test_dedupe_keeps_first_and_logs(caplog):
    pairs = synthetic(3)
    flipped = Pair(pairs[1].id, pairs[1].prompt, pairs[1].rejected, pairs[1].chosen, "t")
    assert dedupe(pairs + [pairs[0], flipped]) == pairs
    assert "dropped 2 of 5 pairs as duplicates (same prompt and answers; 1 with the opposite label)" in caplog.text


# ---------------------------------------------------------------- bad input: one line, the file, the problem

HH = '{"chosen": "\\n\\nHuman: q\\n\\nAssistant: good", "rejected": "\\n\\nHuman: q\\n\\nAssistant: bad"}\n'
TRL = '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
PANDA = {"instruction": "i", "input": "", "response1": "a", "response2": "b", "annotator1": 1, "annotator2": 1,
         "annotator3": 1}
BAD = [
    ("bad.jsonl", HH + '{"chosen": "x", \n', "bad.jsonl:2: malformed JSON"),
    ("trunc.jsonl.gz", gzip.compress((HH * 50).encode())[:-30], "trunc.jsonl.gz: truncated or corrupt gzip file"),
    ("notgz.jsonl.gz", HH, "notgz.jsonl.gz: truncated or corrupt gzip file"),
    ("utf.jsonl", TRL.encode() + b'{"prompt": "\xff"}\n', "utf.jsonl:2: invalid UTF-8"),
    ("utf.csv", b"prompt,chosen,rejected\nq,a,b\nq,\xff,b\n", "utf.csv:3: invalid UTF-8"),
    ("empty.jsonl", "", "empty.jsonl: no records (empty file)"),
    ("blank.json", "[]", "blank.json: no records (empty file)"),
    ("missing.jsonl", TRL + '{"prompt": "q", "chosen": "a"}\n', "missing.jsonl:2: missing field 'rejected'"),
    ("int.jsonl", '{"prompt": "q", "chosen": 3, "rejected": "b"}\n', "int.jsonl:1: field 'chosen' is an int, expected a string"),
    ("list.jsonl", TRL + '{"prompt": "q", "chosen": ["a"], "rejected": "b"}\n',
     "list.jsonl:2: field 'chosen' is a list, expected a string"),
    ("null.json", json.dumps([{"prompt": "q", "chosen": "a", "rejected": None}]),
     "null.json:record 0: field 'rejected' is null, expected a string"),
    ("num.jsonl", "42\n", "num.jsonl:1: expected a JSON object, got an int"),
    ("same.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "a"}\n{"prompt": "q", "chosen": "", "rejected": ""}\n',
     "same.jsonl: no usable pairs (all 2 records dropped: 1 identical chosen and rejected, 1 empty chosen or rejected)"),
    ("role.jsonl", json.dumps({"chosen": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "b"}]}) + "\n",
     "role.jsonl:1: unknown role 'wizard' in 'chosen' (expected system, user or assistant)"),
    ("turns.jsonl", json.dumps({"chosen": CHAT["chosen"][:2], "rejected": CHAT["rejected"]}) + "\n",
     "turns.jsonl:1: 'chosen' must end with an assistant message"),
    ("votes.json", json.dumps([PANDA, {**PANDA, "annotator1": 7}]),
     "votes.json:record 1: 'annotator1' must be 0 (tie), 1 or 2 (better response), got 7"),
    ("nan.json", '[{"instruction": "i", "response1": "a", "response2": "b", "annotator1": NaN, "annotator2": 1, '
                 '"annotator3": 1}]', "nan.json:record 0: 'annotator1' must be 0 (tie), 1 or 2 (better response), got nan"),
    ("ties.json", json.dumps([{**PANDA, "annotator1": 0, "annotator2": 0}]),
     "ties.json: no usable pairs (all 1 records dropped: 1 annotators' majority is a tie)"),
    ("prefix.jsonl", '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: x", "rejected": "\\n\\nHuman: b\\n\\nAssistant: y"}\n',
     "prefix.jsonl:1: chosen and rejected dialogues do not share a prefix ending in '\\n\\nAssistant:'"),
    ("noturn.jsonl", '{"chosen": "x", "rejected": "y"}\n',
     "noturn.jsonl:1: 'chosen'/'rejected' without a 'prompt' field and not HH-RLHF dialogues"),
    ("keys.jsonl", '{"question": "q", "good": "a"}\n',
     "keys.jsonl:1: unrecognised record format (fields: question, good); supported: HH-RLHF"),
    ("syntax.json", '[\n{"prompt": "q",\n "chosen": }\n]', "syntax.json:3: malformed JSON (Expecting value)"),
    ("data.txt", "hello\n", "data.txt: unsupported file type"),
]


@pytest.mark.parametrize("name, content, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gives_one_line_error(tmp_path, name, content, needle):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    for load in (load_pairs, load_unlabelled):
        with pytest.raises(UserError) as e:
            load(str(f))
        msg = str(e.value)
        assert msg.startswith(str(f)) and needle in msg and "\n" not in msg


@pytest.mark.parametrize("spec, needle", [
    ("/nonexistent/data.jsonl", "/nonexistent/data.jsonl: no such file"),
    ("hh-rlhf:nonsense-base", "hh-rlhf:nonsense-base: unknown dataset 'hh-rlhf:nonsense-base'; known: "
                              "hh-rlhf:helpful-base, hh-rlhf:harmless-base, hh-rlhf:helpful-online, ultrafeedback, pandalm"),
    ("foo:bar", "foo:bar: unknown dataset 'foo:bar'; known: hh-rlhf:helpful-base"),
    ("nothing", "nothing: no such file or dataset 'nothing'"),
])
def test_unknown_dataset_and_missing_file(spec, needle):
    with pytest.raises(UserError) as e:
        load_pairs(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_data_exit_code_2_no_traceback_nothing_written(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(HH + "{oops\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "ser", "train-rm", "--out", str(out), f"--data.train={f}"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == f"error: {f}:2: malformed JSON (Expecting property name enclosed in double quotes)"
    assert "Traceback" not in p.stderr and not out.exists()
