"""Hostile input through the real CLI: exit code 2, one line `error: FILE[:RECORD]: problem`, no traceback,
nothing written. Bad data fails before any model is loaded: the data cases name an RM or backbone directory that
does not exist, so bad data that got through would fail with the wrong message (and never train). Config errors
fail at parse time."""

import contextlib
import gzip
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import types

import pytest

HH = '{"chosen": "\\n\\nHuman: q\\n\\nAssistant: good", "rejected": "\\n\\nHuman: q\\n\\nAssistant: bad"}\n'
GOOD = "".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n" for i in range(12))
MAPPED = ["--data.columns={prompt: q, answer_a: a, answer_b: b, label: l}"]
LOG_LINE = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING) [\w.]+: ")  # the CLI's logging format (progress, not errors)


# ---------------------------------------------------------------- setup steps: (tmp dir, tiny saved RM) -> None


def file(name, content):
    def setup(t, rm):
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        (t / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def huge_line(t, rm):
    """A valid JSON record on one 50 MB line, after a good one: an error naming line 2, read in bounded memory."""
    with open(t / "big.jsonl", "wb") as f:
        f.write(GOOD.splitlines(keepends=True)[0].encode())
        f.write(b'{"prompt": "q", "chosen": "' + b"a" * (50 << 20) + b'", "rejected": "b"}\n')


def directory(name):
    return lambda t, rm: (t / name).mkdir()


def model_dir(name, keep=(), corrupt=None, manifest=None):
    """A copy of the tiny saved RM with only the files in `keep` (all when empty), `corrupt` overwritten with
    junk or one byte flipped (`corrupt=(file, "flip")`), and manifest.json replaced by `manifest`."""
    def setup(t, rm):
        d = t / name
        shutil.copytree(rm, d)
        for f in d.iterdir():
            if keep and f.name not in keep:
                f.unlink()
        if corrupt:
            f, junk = corrupt
            if junk == "flip":  # same size: only the hash can tell
                data = bytearray((d / f).read_bytes())
                data[len(data) // 2] ^= 0xFF
                junk = bytes(data)
            (d / f).write_bytes(junk)
        if manifest is not None:
            (d / "manifest.json").write_text(manifest)
    return setup


def steps(*fns):
    def setup(t, rm):
        for fn in fns:
            fn(t, rm)
    return setup


# ---------------------------------------------------------------- commands ({t}: tmp dir, {out}: output dir)


def train(spec, *extra):
    return ["train-rm", "--out", "{out}", f"--data.train={{t}}/{spec}", "--model.backbone={t}/no-backbone", *extra]


def score(spec):
    return ["score", "--rm", "{t}/no-rm", "--data", f"{{t}}/{spec}", "--out", "{out}/scores.jsonl"]


def evaluate(spec):
    return ["eval", "--rm", "{t}/no-rm", "--data", f"{{t}}/{spec}"]


def config(name="c.yaml"):
    return ["train-rm", "--config", f"{{t}}/{name}", "--out", "{out}"]


def eval_rm(rm_name):
    return ["eval", "--rm", f"{{t}}/{rm_name}", "--data", "{t}/good.jsonl"]


def train_backbone(backbone):
    return ["train-rm", "--out", "{out}", "--data.train={t}/good.jsonl", "--data.test_size=2",
            f"--model.backbone={backbone}"]


good = file("good.jsonl", GOOD)
no_parquet = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")


def conversation(role, answer):
    return [{"role": role, "content": "hi"}, {"role": "assistant", "content": answer}]


# (id, setup, argv, substrings of the one error line)
CASES = [
    # data: every format, every way a record can be wrong
    ("invalid-utf8", file("utf.jsonl", HH.encode() + b'{"chosen": "\xff\xfe"}\n'), train("utf.jsonl"),
     ["{t}/utf.jsonl:2: invalid UTF-8"]),
    ("truncated-gzip", file("t.jsonl.gz", gzip.compress((HH * 50).encode())[:-30]), score("t.jsonl.gz"),
     ["{t}/t.jsonl.gz: truncated or corrupt gzip file"]),
    ("chosen-is-a-number", file("n.jsonl", '{"prompt": "q", "chosen": 3, "rejected": "b"}\n'), train("n.jsonl"),
     ["{t}/n.jsonl:1: field 'chosen' is int, expected a string"]),
    ("chosen-is-a-list-of-strings", file("l.jsonl", '{"prompt": "q", "chosen": ["a"], "rejected": ["b"]}\n'),
     train("l.jsonl"), ["{t}/l.jsonl:1: conversational chosen/rejected must be lists of message objects"]),
    ("50mb-single-line", huge_line, train("big.jsonl"), ["{t}/big.jsonl:2: line longer than 16 MiB"]),
    ("empty-file", file("empty.jsonl", ""), train("empty.jsonl"), ["{t}/empty.jsonl: no records (empty file)"]),
    ("missing-field", file("m.jsonl", GOOD + '{"prompt": "q", "chosen": "a"}\n'), train("m.jsonl"),
     ["{t}/m.jsonl:13: unrecognised record format (fields: prompt, chosen)"]),
    ("label-nan", file("nan.jsonl", '{"q": "q", "a": "x", "b": "y", "l": NaN}\n'), train("nan.jsonl", *MAPPED),
     ["{t}/nan.jsonl:1: label must be 0 or 1", "got nan"]),
    ("label-out-of-range", file("lab.csv", "q,a,b,l\nq1,x,y,0\nq2,x,y,2\n"), train("lab.csv", *MAPPED),
     ["{t}/lab.csv:3: label must be 0 or 1", "got 2"]),
    ("annotator-vote-nan", file("votes.json", '[{"instruction": "i", "response1": "a", "response2": "b", '
                                              '"annotator1": NaN, "annotator2": 1, "annotator3": 1}]'),
     evaluate("votes.json"), ["{t}/votes.json:0: 'annotator1' must be 0, 1 or 2, got nan"]),
    ("unknown-chat-role", file("role.jsonl", json.dumps({"chosen": conversation("wizard", "a"),
                                                         "rejected": conversation("wizard", "b")}) + "\n"),
     train("role.jsonl"), ["{t}/role.jsonl:1: unknown chat role 'wizard'"]),
    ("chat-role-not-a-string", file("rl.jsonl", json.dumps({"chosen": conversation(["user"], "a"),
                                                            "rejected": conversation(["user"], "b")}) + "\n"),
     train("rl.jsonl"), ["{t}/rl.jsonl:1: messages must be objects with string 'role' and 'content'"]),
    ("malformed-json-line", file("bad.jsonl", HH + '{"chosen": "x", \n'), score("bad.jsonl"),
     ["{t}/bad.jsonl:2: malformed JSON"]),
    ("json-object-not-list", file("o.json", '{"prompt": "q", "chosen": "a", "rejected": "b"}'), train("o.json"),
     ["{t}/o.json: expected a JSON list of records"]),
    ("json-nested-too-deeply", file("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"), train("deep.jsonl"),
     ["{t}/deep.jsonl:1: JSON nested too deeply"]),
    ("unpaired-surrogate", file("s.jsonl", '{"prompt": "q\\ud800", "chosen": "a", "rejected": "b"}\n'),
     train("s.jsonl"), ["{t}/s.jsonl:1: text is not valid Unicode"]),
    ("csv-ragged-row", file("r.csv", "prompt,chosen,rejected\nq,a,b\nq2,a2,b2,extra\n"), evaluate("r.csv"),
     ["{t}/r.csv:3: row has 4 fields, the header has 3"]),
    ("csv-short-row", file("s.csv", "prompt,chosen,rejected\nq,a,b\nq2,a2\n"), train("s.csv"),
     ["{t}/s.csv:3: row has 2 fields, the header has 3"]),
    ("integer-of-5000-digits", file("d.jsonl", GOOD + '{"id": ' + "1" * 5000 + ', "prompt": "q", "chosen": "a", '
                                                    '"rejected": "b"}\n'), train("d.jsonl"),
     ["{t}/d.jsonl:13: unreadable JSON value (Exceeds the limit (4300 digits) for integer string conversion"]),
    ("json-list-integer-of-5000-digits", file("d.json", '[{"prompt": "q", "chosen": "a", "rejected": "b", "n": '
                                                        + "9" * 5000 + "}]"), train("d.json"),
     ["{t}/d.json: unreadable JSON value (Exceeds the limit"]),
    ("label-superscript-digit", file("sup.csv", "q,a,b,l\nq1,x,y,0\nq2,x,y,\u00b2\n"), train("sup.csv", *MAPPED),
     ["{t}/sup.csv:3: label must be 0 or 1", "got '\u00b2'"]),
    ("label-double-minus", file("dm.csv", "q,a,b,l\nq1,x,y,--1\n"), train("dm.csv", *MAPPED),
     ["{t}/dm.csv:2: label must be 0 or 1", "got '--1'"]),
    ("label-of-5000-digits", file("ld.csv", "q,a,b,l\nq1,x,y," + "1" * 5000 + "\n"), train("ld.csv", *MAPPED),
     ["{t}/ld.csv:2: label must be 0 or 1", "got '11111"]),
    ("csv-repeated-column", file("h.csv", "prompt,chosen,chosen\nq,a,b\n"), train("h.csv"),
     ["{t}/h.csv:1: the header names column 'chosen' twice"]),
    ("csv-repeated-column-after-blank-lines", file("h.csv", "\n\nprompt,chosen,chosen\nq,a,b\n"), train("h.csv"),
     ["{t}/h.csv:3: the header names column 'chosen' twice"]),
    ("score-beyond-float-range", file("sc.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 1'
                                                  + "0" * 400 + ', "score_rejected": 1}\n'), train("sc.jsonl"),
     ["{t}/sc.jsonl:1: 'score_chosen' must be a finite number, got 1000", "(401 characters)"]),
    ("string-prompt-not-in-its-conversation",
     file("cv.jsonl", json.dumps({"prompt": "something else", "chosen": conversation("user", "a"),
                                  "rejected": conversation("user", "b")}) + "\n"), train("cv.jsonl"),
     ["{t}/cv.jsonl:1: field 'prompt' is not one of the user turns"]),
    ("image-content-part",
     file("img.jsonl", json.dumps({"chosen": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                                              {"role": "assistant", "content": "a cat"}],
                                  "rejected": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                                               {"role": "assistant", "content": "a dog"}]}) + "\n"), train("img.jsonl"),
     ["{t}/img.jsonl:1: message content parts must all be {\"type\": \"text\", \"text\": ...}, got image"]),
    ("bom-then-blank-line-only", file("bom.jsonl", b"\xef\xbb\xbf\n"), train("bom.jsonl"),
     ["{t}/bom.jsonl: no records (empty file)"]),
    ("pandalm-split-it-lacks", None, ["train-rm", "--out", "{out}", "--data.train=pandalm:train"],
     ["pandalm:train: pandalm has only the split 'test'"]),
    pytest.param("corrupt-parquet", file("x.parquet", "not parquet"), train("x.parquet"),
                 ["{t}/x.parquet: not a readable parquet file"], marks=no_parquet),
    ("directory-as-data-file", directory("adir"), train("adir"), ["{t}/adir: is a directory, expected a data file"]),
    ("no-such-data-file", None, train("nope.jsonl"), ["{t}/nope.jsonl: no such file"]),
    ("unsupported-file-type", file("x.txt", "hello\n"), train("x.txt"), ["{t}/x.txt: unsupported file type"]),
    ("unlabelled-file-for-training", file("u.jsonl", '{"prompt": "q", "answer_a": "x", "answer_b": "y"}\n'),
     train("u.jsonl"), ["{t}/u.jsonl:1: the record has no labels"]),
    ("only-blank-answers", file("w.jsonl", '{"prompt": "q", "chosen": " ", "rejected": "b"}\n' * 2),
     train("w.jsonl"), ["{t}/w.jsonl: no usable pairs (all 2 records dropped", "empty answer"]),
    ("dialogues-without-shared-prefix",
     file("p.jsonl", '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: x", "rejected": "\\n\\nHuman: b\\n\\nAssistant: y"}\n'),
     train("p.jsonl"), ["{t}/p.jsonl:1: chosen and rejected dialogues do not share a prefix"]),
    ("json-key-twice", file("k.jsonl", GOOD + '{"prompt": "q", "chosen": "a", "chosen": "z", "rejected": "b"}\n'),
     train("k.jsonl"), ["{t}/k.jsonl:13: key 'chosen' appears twice in the record"]),
    ("labelled-and-unlabelled-records",
     file("mix.jsonl", '{"prompt": "q", "answer_a": "x", "answer_b": "y"}\n' + GOOD), score("mix.jsonl"),
     ["{t}/mix.jsonl:2: a labelled (chosen/rejected) record, but record 1 is an unlabelled (answer_a/answer_b) one"]),
    ("score-out-is-its-input", good, ["score", "--rm", "{t}/no-rm", "--data", "{t}/good.jsonl", "--out",
                                      "{t}/good.jsonl"], ["{t}/good.jsonl: --out would overwrite the input"]),
    # config: fails at parse time, before any data or model
    ("setting-out-of-range", None, ["train-rm", "--out", "{out}", "--train.weight_decay=-1"],
     ["command line: 'train.weight_decay' must lie in [0, ∞), got -1.0"]),
    ("yaml-unknown-key", file("c.yaml", "train:\n  lrr: 1\n"), config(), ["{t}/c.yaml: unknown config key 'train.lrr'"]),
    ("yaml-wrong-type", file("c.yaml", "train:\n  batch_size: many\n"), config(),
     ["{t}/c.yaml: 'train.batch_size' must be int, got 'many'"]),
    ("yaml-nan-value", file("c.yaml", "train:\n  lr: .nan\n"), config(),
     ["{t}/c.yaml: 'train.lr' must be a finite number"]),
    ("yaml-min-pairs-zero", file("c.yaml", "ser:\n  min_pairs: 0\n"), config(),
     ["{t}/c.yaml: 'ser.min_pairs' must be a count >= 1 or a fraction in (0, 1], got 0"]),
    ("yaml-duplicate-key", file("c.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n"), config(),
     ["{t}/c.yaml:3: key 'lr' appears twice"]),
    ("yaml-not-a-mapping", file("c.yaml", "- train\n- lr\n"), config(),
     ["{t}/c.yaml: expected a mapping of sections"]),
    ("yaml-syntax-error", file("c.yaml", "data:\n  train: [\n"), config(), ["{t}/c.yaml: not valid YAML"]),
    ("config-is-a-directory", directory("cdir"), config("cdir"), ["{t}/cdir: is a directory, expected a YAML"]),
    ("config-path-through-a-file", file("c.yaml", "train: {}\n"), config("c.yaml/x.yaml"),
     ["{t}/c.yaml/x.yaml: cannot read the config file (Not a directory)"]),
    ("data-file-name-too-long", None, train("x" * 300 + ".jsonl"),
     ["cannot look up this data path (File name too long)"]),
    ("lora-target-typo", good, ["train-rm", "--out", "{out}", "--data.train={t}/good.jsonl", "--data.test_size=2",
                                "--model.mode=lora",
                                "--model.lora_targets=[nosuch]"],
     ["config: 'model.lora_targets' names 'nosuch', which is no module of"]),
    ("experiment-backbone-typo", good, ["experiment", "--out", "{out}", "--data.train={t}/good.jsonl",
                                        "--model.backbone={t}/nope"], ["unknown backbone '{t}/nope'"]),
    ("curve-backbone-typo", good, ["curve", "--out", "{out}", "--sizes", "5", "--data.train={t}/good.jsonl",
                                   "--model.backbone={t}/nope"], ["unknown backbone '{t}/nope'"]),
    ("experiment-data-typo", None, ["experiment", "--out", "{out}", "--data.train={t}/nope.jsonl"],
     ["{t}/nope.jsonl: no such file"]),
    ("curve-size-beyond-the-data", good, ["curve", "--out", "{out}", "--sizes", "5,500", "--data.train={t}/good.jsonl",
                                          "--data.test_size=2"], ["--sizes: 500 means 500 labels, but the split has 10"]),
    ("curve-into-an-experiment", steps(good, file("exp/command", "experiment\n"), file("exp/settings.json", "{}")),
     ["curve", "--out", "{t}/exp", "--sizes", "5", "--data.train={t}/good.jsonl", "--data.test_size=2"],
     ["{t}/exp: holds a `ser experiment` run; give `ser curve` another --out"]),
    ("train-rm-into-an-experiment", steps(good, file("exp/command", "experiment\n"), file("exp/settings.json", "{}")),
     ["train-rm", "--out", "{t}/exp", "--data.train={t}/good.jsonl", "--data.test_size=2"],
     ["{t}/exp: already holds a run; `ser experiment` with the same --out continues it"]),
    ("override-unknown-key", None, ["train-rm", "--out", "{out}", "--train.lrr=1"],
     ["command line: unknown config key 'train.lrr'"]),
    ("override-int-with-two-signs", None, ["train-rm", "--out", "{out}", "--train.seed=--5"],
     ["command line: 'train.seed' must be int, got '--5'"]),
    ("override-superscript-digit", None, ["train-rm", "--out", "{out}", "--data.seed_size=\u00b2"],
     ["command line: 'data.seed_size' must be float or int, got '\u00b2'"]),
    ("override-int-of-5000-digits", None, ["train-rm", "--out", "{out}", "--train.batch_size=" + "1" * 5000],
     ["command line: 'train.batch_size' must be int, got '1111", "(5002 characters)"]),
    ("yaml-int-of-5000-digits", file("c.yaml", "train:\n  seed: " + "1" * 5000 + "\n"), config(),
     ["{t}/c.yaml: an integer of more than 4300 digits"]),
    # model directories: after the data loaded, before anything is written
    ("rm-without-weights", steps(good, model_dir("rm", keep=["config.json"])), eval_rm("rm"),
     ["{t}/rm: model directory has no weights"]),
    ("backbone-without-weights", steps(good, model_dir("bb", keep=["config.json"])), train_backbone("{t}/bb"),
     ["{t}/bb: model directory has no weights"]),
    ("rm-does-not-exist", good, eval_rm("nope"), ["{t}/nope: no such reward-model directory"]),
    ("backbone-does-not-exist", good, train_backbone("{t}/nope"), ["unknown backbone '{t}/nope'"]),
    ("backbone-hub-id-not-cached", good, train_backbone("nobody/no-such-model"),
     ["nobody/no-such-model: cannot load a tokenizer"]),
    ("rm-without-tokenizer", steps(good, model_dir("rm", keep=["config.json", "model.safetensors"])),
     eval_rm("rm"), ["{t}/rm: model directory has no tokenizer"]),
    ("rm-truncated-weights-no-manifest",
     steps(good, model_dir("rm", keep=["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
                           corrupt=("model.safetensors", b"\x01\x02"))),
     eval_rm("rm"), ["{t}/rm: cannot load a model"]),
    ("rm-config-not-json", steps(good, model_dir("rm", keep=["config.json", "model.safetensors", "tokenizer.json",
                                                             "tokenizer_config.json"], corrupt=("config.json", b"{"))),
     eval_rm("rm"), ["{t}/rm: cannot load a tokenizer", "not a valid JSON file"]),
    ("manifest-hash-mismatch", steps(good, model_dir("rm", corrupt=("model.safetensors", "flip"))), eval_rm("rm"),
     ["{t}/rm: checkpoint file 'model.safetensors' is corrupt (hash mismatch)"]),
    ("manifest-lists-missing-file", steps(good, model_dir("rm", keep=["config.json", "model.safetensors",
                                                                      "manifest.json", "tokenizer_config.json"])),
     eval_rm("rm"), ["{t}/rm: checkpoint file 'ser_config.json' is missing"]),
    ("manifest-not-an-object", steps(good, model_dir("rm", manifest="[]")), eval_rm("rm"),
     ["{t}/rm/manifest.json: corrupt manifest"]),
]


def _id(case):
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.fixture(scope="module")
def tiny_rm(tiny_bert_dir, tmp_path_factory):
    """A saved reward-model directory (manifest included) of the 2-layer random BERT: loads in milliseconds."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ser.checkpoint import save_reward_model

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert_dir, num_labels=1))
    out = tmp_path_factory.mktemp("tiny-rm") / "rm"
    return save_reward_model(model, AutoTokenizer.from_pretrained(tiny_bert_dir), out,
                             {"config": {"model": {"max_length": 64}}})


def _fill(text, t):
    return text.replace("{out}", str(t / "out")).replace("{t}", str(t))


def _ser(argv, t, timeout=120):
    """`python -m ser ARGV` in an empty working directory (which must stay empty)."""
    cwd = t / "cwd"
    cwd.mkdir(exist_ok=True)
    argv = [_fill(a, t) for a in argv]
    p = subprocess.run([sys.executable, "-m", "ser", *argv], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert not any(cwd.iterdir()), f"wrote into the working directory: {list(cwd.iterdir())}"
    return p


def _ser_in_process(argv, t, monkeypatch):
    """What `_ser` checks, with the console script's `main()` called in this process: the same exit code, stdout
    and stderr lines (ser's log records go to pytest's handlers, not to stderr), without a new interpreter's
    import of torch and transformers (seconds per case; `SUBPROCESS` keeps a few cases end to end)."""
    from ser.cli import main

    cwd = t / "cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["ser", *(_fill(a, t) for a in argv)])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main()
    assert not any(cwd.iterdir()), f"wrote into the working directory: {list(cwd.iterdir())}"
    return types.SimpleNamespace(returncode=e.value.code, stdout=out.getvalue(), stderr=err.getvalue())


# One case of each kind (data, config, model directory) also runs as its own `python -m ser` process.
SUBPROCESS = {"invalid-utf8", "yaml-syntax-error", "rm-without-weights"}


def test_enough_distinct_cases():
    assert len({_id(c) for c in CASES}) == len(CASES) >= 20
    assert SUBPROCESS <= {_id(c) for c in CASES}


@pytest.mark.parametrize("name, setup, argv, needles", CASES, ids=[_id(c) for c in CASES])
def test_hostile_input_exit_2_one_line_nothing_written(tmp_path, tiny_rm, monkeypatch, name, setup, argv, needles):
    if setup is not None:
        setup(tmp_path, tiny_rm)
    p = _ser(argv, tmp_path) if name in SUBPROCESS else _ser_in_process(argv, tmp_path, monkeypatch)
    output = p.stdout + p.stderr
    assert "Traceback" not in output, output[-3000:]
    assert p.returncode == 2, output[-3000:]
    assert p.stdout == ""
    # one line that is not progress logging: the error, naming the file (and record) and the problem
    lines = [line for line in p.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    for needle in needles:
        assert _fill(needle, tmp_path) in lines[0], lines[0]
    assert not (tmp_path / "out").exists(), "wrote into --out before refusing"
    out = tmp_path / "out"
    written = sorted(f.name for f in out.iterdir()) if out.exists() else []
    assert written == []


# ---------------------------------------------------------------- documented behaviour, not errors (not in CASES)


def test_duplicate_pairs_are_dropped_and_opposite_labels_warned(tmp_path, tiny_rm):
    """Duplicates (same prompt and answers, so the same id) are legitimate in real data (PandaLM has 80): the
    first copy is kept and the count logged; a copy with the other answer chosen is warned about."""
    rec = lambda i, c, r: json.dumps({"prompt": f"q{i}", "chosen": c, "rejected": r}) + "\n"  # noqa: E731
    (tmp_path / "d.jsonl").write_text(rec(0, "a", "b") * 3 + rec(1, "a", "b") + rec(1, "b", "a"))
    p = _ser(["eval", "--rm", str(tiny_rm), "--data", "{t}/d.jsonl", "--json"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["n"] == 2
    assert "dropped 3 duplicate pairs" in p.stderr
    assert "1 duplicate pairs had the opposite label of an earlier copy; kept the earlier label" in p.stderr


def test_prompt_longer_than_max_length_is_cut_not_an_error(tmp_path, tiny_rm):
    """The prompt is cut from the left (the answer is what the RM judges), so a 3,000-word prompt is scored
    normally. Answers that differ only after max_length become identical sequences: scored (a tie), warned."""
    long = " ".join(["word"] * 3000)
    (tmp_path / "long.jsonl").write_text(
        json.dumps({"prompt": long, "chosen": "good answer", "rejected": "bad answer"}) + "\n"
        + json.dumps({"prompt": "q", "chosen": long + " yes", "rejected": long + " no"}) + "\n")
    p = _ser(["eval", "--rm", str(tiny_rm), "--data", "{t}/long.jsonl", "--json"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(p.stdout)
    assert m["n"] == 2 and m["ties"] == 1  # the truncated-identical pair: equal rewards, a tie (counted wrong)
    assert "1 of 2 pairs have identical answers after truncation to max_length=64" in p.stderr


@pytest.mark.parametrize("name, content", [
    ("bom.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'),
    ("bom.json", '[{"prompt": "q", "chosen": "a", "rejected": "b"}]'),
    ("bom.csv", "prompt,chosen,rejected\nq,a,b\n"),
])
def test_byte_order_mark_is_not_part_of_the_data(tmp_path, name, content):
    """Excel and Windows editors start UTF-8 files with a BOM; it is not part of the first field name or value."""
    from ser.data import load_pairs

    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content.encode())
    assert [(p.prompt, p.chosen, p.rejected) for p in load_pairs(str(tmp_path / name))] == [("q", "a", "b")]
