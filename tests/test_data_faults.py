"""The data faults of ../shared/cases/data-faults (each fault's whole kind): non-finite rewards and strict JSON,
TRL's standard/conversational x implicit/explicit-prompt formats, test pairs leaking into training, pairs with
no preference left after tokenization or truncation, rating ties, and `ser score` output that joins back."""

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ser.checkpoint import append_jsonl, json_text, save_reward_model
from ser.cli import run
from ser.config import Config, DataConfig, TrainConfig, load_config
from ser.data import Pair, drop_test_pairs, load_pairs, load_records, pair_id
from ser.errors import UserError
from ser.evaluate import pair_metrics
from ser.models import encode_pairs, load_reward_model
from ser.pipeline import load_splits, run_eval, run_score
from ser.scoring import score_pairs
from ser.train import make_accelerator, train_reward_model

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT.parent / "shared" / "cases" / "data-faults"


def strict_loads(text):
    """json.loads that rejects the bare NaN / Infinity / -Infinity that Python's json writes by default."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def case(name):
    if not (CASES / name).exists():
        pytest.skip(f"case file not found: {CASES / name}")
    return str(CASES / name)


@pytest.fixture(scope="module")
def tiny_rm(tiny_bert_dir, tmp_path_factory):
    """A saved RM directory: the 2-layer random BERT with MiniLM's (uncased) tokenizer, max_length 64."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert_dir, num_labels=1))
    return save_reward_model(model, AutoTokenizer.from_pretrained(tiny_bert_dir),
                             tmp_path_factory.mktemp("rm") / "rm", {"config": {"model": {"max_length": 64}}})


def poisoned_rm(tiny_rm, out, word=None):
    """A copy of `tiny_rm` whose embedding row of `word`'s first token is NaN (every row when word is None): NaN
    rewards for the sequences that contain it, as make_rm_nan.py does."""
    shutil.copytree(tiny_rm, out)
    (out / "manifest.json").unlink()
    rm, tok = load_reward_model(str(out))
    with torch.no_grad():
        emb = rm.bert.embeddings.word_embeddings.weight
        if word is None:
            emb.fill_(float("nan"))
        else:
            emb[tok(word, add_special_tokens=False)["input_ids"][0]] = float("nan")
    rm.save_pretrained(out, safe_serialization=True)
    return out


NAN_PARTIAL = [  # the first chosen answer holds "zebra"
    {"prompt": "What animal has black and white stripes?", "chosen": "A zebra has stripes.", "rejected": "A frog."},
    {"prompt": "What colour is the sky?", "chosen": "It is usually blue.", "rejected": "It is green."},
    {"prompt": "Give me a greeting.", "chosen": "Hello there!", "rejected": "Go away."},
    {"prompt": "How many days are in a week?", "chosen": "Seven.", "rejected": "About a dozen."},
]


# ---------------------------------------------------------------- 1. non-finite rewards, strict JSON


def test_pair_metrics_leave_out_and_count_non_finite_pairs():
    # margins: 1, (NaN), -1, (inf - 0): the two finite pairs give accuracy 1/2 and mean margin 0
    m = pair_metrics([1.0, math.nan, 0.0, math.inf], [0.0, 0.0, 1.0, 0.0], ["a", "a", "b", "b"])
    assert (m["n"], m["non_finite"], m["accuracy"], m["mean_margin"]) == (2, 2, 0.5, 0.0)
    assert m["accuracy_by_source"] == {"a": 1.0, "b": 0.0}
    assert m["reward_mean"] == 0.5  # (1 + 0 + 0 + 1) / 4
    assert math.isfinite(m["ece"]) and math.isfinite(m["brier"])


def test_every_json_writer_is_strict(tmp_path):
    text = json_text({"a": math.nan, "b": [math.inf, 1.5, -math.inf], "c": np.float32("nan"), "d": np.int64(3),
                      "e": np.float64(0.25), "f": True})
    assert strict_loads(text) == {"a": None, "b": [None, 1.5, None], "c": None, "d": 3, "e": 0.25, "f": True}
    append_jsonl(tmp_path / "m.jsonl", {"rm/acc": math.nan, "step": 1})
    assert strict_loads((tmp_path / "m.jsonl").read_text()) == {"rm/acc": None, "step": 1}


def test_eval_and_score_name_and_leave_out_non_finite_rewards(tiny_rm, tmp_path, capsys, caplog):
    data = write_jsonl(tmp_path / "nan.jsonl", NAN_PARTIAL)
    rm = poisoned_rm(tiny_rm, tmp_path / "rm-nan", "zebra")
    assert run(["eval", "--rm", str(rm), "--data", data, "--json"]) == 0
    m = strict_loads(capsys.readouterr().out)
    assert (m["n"], m["non_finite"], m["non_finite_records"]) == (3, 1, [1])
    assert f"1 of 4 pairs have a non-finite reward (NaN or inf) from the reward model: {data}:1" in caplog.text
    assert all(v is None or math.isfinite(v) for v in (m["mean_margin"], m["ece"], m["brier"]))
    run(["eval", "--rm", str(rm), "--data", data])
    assert "left out: 1 pair with a non-finite reward (NaN or inf), record 1\n" in capsys.readouterr().out
    out = tmp_path / "s.jsonl"
    assert run(["score", "--rm", str(rm), "--data", data, "--out", str(out)]) == 0
    rows = [strict_loads(line) for line in out.read_text().splitlines()]
    assert [r["record"] for r in rows] == [2, 3, 4]
    skipped = [strict_loads(line) for line in (tmp_path / "s.skipped.jsonl").read_text().splitlines()]
    assert [(s["record"], s["reason"], s["r_chosen"]) for s in skipped] == [(1, "non-finite reward", None)]


def test_a_model_with_no_finite_reward_is_an_error_and_writes_nothing(tiny_rm, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", NAN_PARTIAL)
    rm = poisoned_rm(tiny_rm, tmp_path / "rm-all-nan")
    with pytest.raises(UserError, match="every reward on .*d.jsonl is non-finite"):
        run_eval(str(rm), data)
    with pytest.raises(UserError, match="non-finite"):
        run_score(str(rm), data, tmp_path / "out" / "s.jsonl")
    assert not (tmp_path / "out").exists()


def test_make_rm_nan_case(tiny_rm, tmp_path, capsys):
    """The case files: nan_partial.jsonl on an RM poisoned as make_rm_nan.py does."""
    rm = poisoned_rm(tiny_rm, tmp_path / "rm-nan", "zebra")
    assert run(["eval", "--rm", str(rm), "--data", case("nan_partial.jsonl"), "--json"]) == 0
    m = strict_loads(capsys.readouterr().out)
    assert (m["n"], m["non_finite_records"]) == (3, [1])


# ---------------------------------------------------------------- 2. TRL formats


def msgs(*turns):
    """user, assistant, user, ... turns."""
    return [{"role": role, "content": text} for role, text in zip(("user", "assistant") * 3, turns)]


def answer(*turns):
    """assistant, user, assistant, ... turns (a completion after an explicit prompt)."""
    return [{"role": role, "content": text} for role, text in zip(("assistant", "user") * 3, turns)]


FORMATS = [  # (record, expected (prompt, chosen, rejected)), prompts rendered without a chat template
    ("standard-implicit-hh", {"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                              "rejected": "\n\nHuman: hi\n\nAssistant: go"},
     ("\n\nHuman: hi\n\nAssistant:", "hello", "go")),
    ("standard-explicit", {"prompt": "hi", "chosen": "hello", "rejected": "go"}, ("hi", "hello", "go")),
    ("conversational-implicit", {"chosen": msgs("hi", "hello"), "rejected": msgs("hi", "go")},
     ("\n\nHuman: hi\n\nAssistant:", "hello", "go")),
    ("conversational-implicit-multi-turn", {"chosen": msgs("hi", "hey", "how are you?", "fine"),
                                            "rejected": msgs("hi", "hey", "how are you?", "bad")},
     ("\n\nHuman: hi\n\nAssistant: hey\n\nHuman: how are you?\n\nAssistant:", "fine", "bad")),
    ("conversational-explicit", {"prompt": msgs("hi"), "chosen": answer("hello"), "rejected": answer("go")},
     ("\n\nHuman: hi\n\nAssistant:", "hello", "go")),
    ("conversational-explicit-shared-turns", {"prompt": msgs("hi"), "chosen": answer("hey", "and?", "fine"),
                                              "rejected": answer("hey", "and?", "bad")},
     ("\n\nHuman: hi\n\nAssistant: hey\n\nHuman: and?\n\nAssistant:", "fine", "bad")),
    ("string-prompt-message-answers", {"prompt": "hi", "chosen": answer("hello"), "rejected": answer("go")},
     ("\n\nHuman: hi\n\nAssistant:", "hello", "go")),
    ("message-prompt-string-answers", {"prompt": msgs("hi"), "chosen": "hello", "rejected": "go"},
     ("\n\nHuman: hi\n\nAssistant:", "hello", "go")),
]


@pytest.mark.parametrize("name, record, expected", FORMATS, ids=[f[0] for f in FORMATS])
def test_trl_formats(tmp_path, name, record, expected):
    p = load_pairs(write_jsonl(tmp_path / "f.jsonl", [record]))[0]
    assert (p.prompt, p.chosen, p.rejected) == expected


def test_string_prompt_is_the_user_turn_of_a_chat_template(tmp_path):
    template = lambda m: "".join(f"<{x['role']}>{x['content']}" for x in m) + "<assistant>"  # noqa: E731
    f = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "hi", "chosen": answer("a"), "rejected": answer("b")}])
    assert load_pairs(f, chat_template=template)[0].prompt == "<user>hi<assistant>"


@pytest.mark.parametrize("record, needle", [
    ({"chosen": msgs("capital of France?", "Paris."), "rejected": msgs("capital of Spain?", "Madrid.")},
     "f.jsonl:2: conversational chosen and rejected differ before the last assistant turn"),
    ({"prompt": msgs("hi"), "chosen": answer("hey", "and?", "fine"), "rejected": answer("yo", "and?", "bad")},
     "f.jsonl:2: conversational chosen and rejected differ before the last assistant turn"),
    ({"prompt": 7, "chosen": answer("a"), "rejected": answer("b")},
     "f.jsonl:2: field 'prompt' is int, expected a string or a list of messages"),
    ({"prompt": ["hi"], "chosen": "a", "rejected": "b"},
     "f.jsonl:2: messages must be objects with string 'role' and 'content'"),
])
def test_conversational_pairs_that_are_not_one_conversation_are_errors(tmp_path, record, needle):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    with pytest.raises(UserError) as e:
        load_pairs(write_jsonl(tmp_path / "f.jsonl", [good, record]))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_conversational_case_files():
    with pytest.raises(UserError, match=r"conv_prompt_mismatch.jsonl:1: conversational chosen and rejected differ"):
        load_pairs(case("conv_prompt_mismatch.jsonl"))
    pairs = load_pairs(case("conv_str_prompt.jsonl"))
    assert [p.prompt for p in pairs] == ["\n\nHuman: What is the capital of France?\n\nAssistant:",
                                         "\n\nHuman: Name a primary colour.\n\nAssistant:"]


def test_a_string_prompt_beside_whole_conversations_is_not_doubled(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: `prompt` a string, chosen/rejected whole conversations that hold it
    (TRL's maybe_extract_prompt takes the conversation's own turns); the prompt appears once."""
    turn = {"role": "user", "content": "How do I boil an egg?"}
    rec = {"prompt": "How do I boil an egg?", "chosen": [turn, {"role": "assistant", "content": "Simmer it."}],
           "rejected": [turn, {"role": "assistant", "content": "Microwave it."}], "score_chosen": 8.0,
           "score_rejected": 3.0}
    (pair,) = load_pairs(write_jsonl(tmp_path / "h4.jsonl", [rec]))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("\n\nHuman: How do I boil an egg?\n\nAssistant:",
                                                         "Simmer it.", "Microwave it.")
    # turns that start with the assistant continue the string prompt, which is then the first user turn
    turns = [{"role": "assistant", "content": "Hey."}, {"role": "user", "content": "And?"}]
    rec = {"prompt": "Hi", "chosen": turns + [{"role": "assistant", "content": "Fine."}],
           "rejected": turns + [{"role": "assistant", "content": "No."}]}
    (pair,) = load_pairs(write_jsonl(tmp_path / "continued.jsonl", [rec]))
    assert pair.prompt == "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: And?\n\nAssistant:"


def test_message_content_given_as_text_parts_is_joined(tmp_path):
    """Content as a list of parts (the OpenAI / transformers multimodal form) reads as its text parts joined; it
    matches the same conversation written with plain strings (the shared prefix is compared after joining)."""
    parts = [{"type": "text", "text": "How do I "}, {"type": "text", "text": "boil an egg?"}]
    rec = {"chosen": [{"role": "user", "content": parts}, {"role": "assistant", "content": [
               {"type": "text", "text": "Simmer it."}]}],
           "rejected": [{"role": "user", "content": "How do I boil an egg?"},
                        {"role": "assistant", "content": "Microwave it."}]}
    explicit = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "chosen": "Hello!",
                "rejected": "Go away."}
    a, b = load_pairs(write_jsonl(tmp_path / "parts.jsonl", [rec, explicit]))
    assert (a.prompt, a.chosen, a.rejected) == ("\n\nHuman: How do I boil an egg?\n\nAssistant:", "Simmer it.",
                                                "Microwave it.")
    assert b.prompt == "\n\nHuman: Hi\n\nAssistant:"


# ---------------------------------------------------------------- 3. test pairs never trained on


def qa(i, flip=False, **extra):
    good, bad = f"good answer {i}", f"bad answer {i}"
    return {"prompt": f"q{i}", "chosen": bad if flip else good, "rejected": good if flip else bad, **extra}


def test_drop_test_pairs_in_either_answer_order(caplog):
    mk = lambda c, r: Pair(pair_id("q", c, r), "q", c, r, "s")  # noqa: E731
    test = [mk("a", "b")]
    kept = drop_test_pairs([mk("a", "b"), mk("b", "a"), mk("a", "c")], test, "pool (p.jsonl)")
    assert [(p.chosen, p.rejected) for p in kept] == [("a", "c")]
    assert "removed 2 of 3 pool (p.jsonl) pairs that also appear in the test set" in caplog.text
    with pytest.raises(UserError, match="pool: all 1 pairs also appear in the test set; none left"):
        drop_test_pairs([mk("b", "a")], test, "pool")


def test_a_test_pair_read_from_another_format_is_still_found_in_the_pool(tmp_path):
    """HH-RLHF dialogues give stripped answers, TRL records often keep the leading space: one pair read from the two
    formats has two ids, and the leak check took them for two pairs."""
    prompt = "\n\nHuman: hi\n\nAssistant:"
    (tmp_path / "test.jsonl").write_text(json.dumps({"chosen": prompt + " hello", "rejected": prompt + " go"}) + "\n")
    (tmp_path / "pool.jsonl").write_text(json.dumps({"prompt": prompt, "chosen": " hello", "rejected": " go"}) + "\n"
                                         + json.dumps({"prompt": prompt, "chosen": " hi", "rejected": " bye"}) + "\n")
    test, pool = load_pairs(str(tmp_path / "test.jsonl")), load_pairs(str(tmp_path / "pool.jsonl"))
    assert test[0].id != pool[0].id  # the two formats' texts differ in whitespace
    assert [p.chosen for p in drop_test_pairs(pool, test, "pool")] == [" hi"]


def test_pool_and_seed_pairs_in_the_test_set_are_removed(tmp_path, caplog):
    from ser.evolve import build_pool

    train = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(10)] + [qa(20, flip=True)])
    test = write_jsonl(tmp_path / "test.jsonl", [qa(i) for i in (20, 21, 22)])
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"prompt": f"q{i}", "answer_a": f"bad answer {i}",
                                                  "answer_b": f"good answer {i}"} for i in (21, 30, 31)]
                       + [{"prompt": "q22", "answer_a": "good answer 22", "answer_b": "bad answer 22"}])
    cfg = Config(data=DataConfig(train=train, test=test, pool=pool, seed_size=10, pool_size=0))
    split = load_splits(cfg.data)
    assert len(split.seed) == 10 and "q20" not in {p.prompt for p in split.seed}  # flipped copy of a test pair
    pool_pairs, truth = build_pool(cfg, split)
    assert sorted(p.prompt for p in pool_pairs) == ["q30", "q31"] and truth is None
    assert f"removed 1 of 11 training ({train}) pairs that also appear in the test set" in caplog.text
    assert f"removed 2 of 4 pool ({pool}) pairs that also appear in the test set" in caplog.text


def test_leak_case_files(caplog):
    from ser.evolve import build_pool

    cfg = Config(data=DataConfig(train=case("leak_train.jsonl"), test=case("leak_test.jsonl"),
                                 pool=case("leak_pool.jsonl"), seed_size=24, pool_size=0))
    pool, _ = build_pool(cfg, split := load_splits(cfg.data))
    assert len(pool) == 4 and not {p.id for p in pool} & {p.id for p in split.test}
    assert "removed 6 of 10 pool" in caplog.text


# ---------------------------------------------------------------- 4. no preference after tokenization / truncation


def test_no_preference_pairs_and_their_cause(tiny_bert_dir, caplog):
    tok = load_reward_model(str(tiny_bert_dir))[1]
    long = " ".join(["word"] * 40)
    prompts = ["q", "q", "q", "q"]
    a = ["Put the egg in water.", "A croissant from the café.", long + " yes", "fine"]
    b = ["PUT THE EGG IN WATER.", "A croissant from the cafe.", long + " no", "bad"]
    enc = encode_pairs(tok, prompts, a, b, 24)  # MiniLM's tokenizer is uncased and strips accents
    assert enc.no_preference == [0, 1, 2]
    assert "2 of 4 pairs have identical answers after tokenization" in caplog.text
    assert "1 of 4 pairs have identical answers after truncation to max_length=24" in caplog.text
    caplog.clear()
    encode_pairs(tok, prompts[:2], a[:2], b[:2], 24)
    assert "after tokenization" in caplog.text and "truncation" not in caplog.text
    caplog.clear()  # the same text (`ser judge` compares policies that can answer alike): no tokenizer cause named
    caplog.set_level(logging.INFO)
    enc = encode_pairs(tok, ["q"] * 6, a + ["Same.", long + " same"], b + ["Same.", long + " same"], 24)
    assert enc.no_preference == [0, 1, 2, 4, 5]  # 2 by the tokenizer, 1 by truncation, 2 the same text: 5 in all
    assert "2 of 6 pairs have identical answer texts" in caplog.text
    assert "2 of 6 pairs have identical answers after tokenization" in caplog.text
    assert "1 of 6 pairs have identical answers after truncation to max_length=24" in caplog.text


def test_no_preference_pairs_are_left_out_of_training(tiny_bert_dir, caplog):
    torch.manual_seed(0)
    rm, tok = load_reward_model(str(tiny_bert_dir))
    tcfg = TrainConfig(epochs=1, batch_size=1, lr=1e-3, warmup_ratio=0.0)
    p, c, r = ["q"] * 3, ["Good answer.", "great", "yes"], ["GOOD ANSWER.", "awful", "no"]
    rm, summary = train_reward_model(rm, tok, p, c, r, tcfg, 32, accelerator=make_accelerator(tcfg))
    assert (summary["steps"], summary["pairs"], summary["no_preference"]) == (2, 2, 1)  # 3 steps if trained on
    assert "left 1 of 3 pairs with no preference (identical token ids) out of training" in caplog.text
    with pytest.raises(UserError, match="all 1 training pairs have identical answers"):
        train_reward_model(rm, tok, ["q"], ["Yes."], ["YES."], tcfg, 32, accelerator=make_accelerator(tcfg))


def test_eval_counts_tokenizer_ties_and_names_the_cause(tiny_rm, caplog):
    m = run_eval(str(tiny_rm), case("ties_uncased.jsonl"))
    assert (m["n"], m["ties"]) == (4, 2) and m["accuracy"] <= 0.5  # the two ties count as wrong
    assert "2 of 4 pairs have identical answers after tokenization" in caplog.text
    assert "after truncation" not in caplog.text


# ---------------------------------------------------------------- 5. rating ties


def test_rating_ties_are_dropped_with_a_count(tmp_path, caplog):
    caplog.set_level("INFO")
    f = write_jsonl(tmp_path / "t.jsonl", [qa(0, score_chosen=8.0, score_rejected=8.0),
                                           qa(1, metadata={"score_chosen": 9.0, "score_rejected": 9}),
                                           qa(2, score_chosen=9.0, score_rejected=7.5), qa(3)])
    assert [p.prompt for p in load_pairs(f)] == ["q2", "q3"]
    assert "t: dropped 2 of 4 records (tie: score_chosen == score_rejected)" in caplog.text
    assert len(load_pairs(f, drop_ties=False)) == 4
    csv = tmp_path / "t.csv"
    csv.write_text("prompt,chosen,rejected,score_chosen,score_rejected\nq,a,b,5,5.0\nq2,a,b,6,5\nq3,a,b,,5\n")
    assert [p.prompt for p in load_pairs(str(csv))] == ["q2", "q3"]  # an empty cell is no rating, as JSON null is
    unrated = write_jsonl(tmp_path / "u.jsonl", [qa(0, score_chosen=None, score_rejected=5),
                                                 qa(1, score_chosen="", score_rejected=5),
                                                 qa(2, score_chosen=" ", score_rejected=5)])
    assert len(load_pairs(unrated)) == 3
    bad = write_jsonl(tmp_path / "b.jsonl", [qa(0, score_chosen="high", score_rejected=1)])
    with pytest.raises(UserError, match="b.jsonl:1: 'score_chosen' must be a finite number, got 'high'"):
        load_pairs(bad)


def test_drop_ties_is_a_config_field(tmp_path, shared_data):
    assert DataConfig().drop_ties is True
    cfg = load_config(None, ["data.drop_ties=false", "data.train=ultrafeedback", "data.test_size=0",
                             "data.seed_size=1.0"])
    assert cfg.data.drop_ties is False and len(load_splits(cfg.data).seed) == 994
    assert len(load_pairs("ultrafeedback")) == 884  # 110 of the 994 usable pairs are rating ties


# ---------------------------------------------------------------- 6. `ser score` joins back to its input


def test_eval_and_score_read_a_file_through_data_columns(tiny_rm, tmp_path, capsys):
    """A file that `ser train-rm` reads through data.columns is readable by `ser eval` and `ser score` too: the
    error's own remedy (data.columns) is an option of theirs; a bad mapping is the config's one-line error."""
    data = write_jsonl(tmp_path / "cols.jsonl", [
        {"input": f"Name thing {i}.", "output_1": f"Thing {i}.", "output_2": "No.", "label": i % 2}
        for i in range(6)])
    mapping = "--data.columns={prompt: input, answer_a: output_1, answer_b: output_2, label: label}"
    with pytest.raises(UserError, match=r"unrecognised record format .* or a column mapping \(data.columns\)"):
        run(["eval", "--rm", str(tiny_rm), "--data", data, "--json"])
    assert run(["eval", "--rm", str(tiny_rm), "--data", data, "--json", mapping]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6
    out = tmp_path / "s.jsonl"
    assert run(["score", "--rm", str(tiny_rm), "--data", data, "--out", str(out), mapping]) == 0
    assert [strict_loads(line)["record"] for line in out.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(UserError, match="YAML needs a space after each colon"):
        run(["eval", "--rm", str(tiny_rm), "--data", data, "--data.columns={prompt:input}"])


def test_a_seed_fraction_names_what_it_is_a_fraction_of():
    from ser.data import split_pairs

    pairs = [Pair(f"id{i}", f"q{i}", f"a{i}", f"b{i}", "t") for i in range(40)]
    with pytest.raises(UserError, match=r"data.seed_size = 1.0 is a fraction of all 40, the test pairs included; "
                                        r"for every pair but the test pairs give a count: data.seed_size=32\)"):
        split_pairs(pairs, seed_size=1.0, test_size=8)
    assert len(split_pairs(pairs, seed_size=32, test_size=8).seed) == 32


def test_score_output_joins_back_to_the_input(tiny_rm, tmp_path, capsys):
    data = write_jsonl(tmp_path / "j.jsonl", [
        {"sample_id": "s1", "prompt": "Name a planet.", "chosen": "Mars.", "rejected": "The Moon."},
        {"sample_id": "s2", "prompt": "Name a planet.", "chosen": "Mars.", "rejected": "The Moon."},
        {"sample_id": "s3", "prompt": "Name a metal.", "chosen": "Iron.", "rejected": "Iron."},
        {"sample_id": "s4", "prompt": "Name a tree.", "chosen": "An oak.", "rejected": ""},
        {"sample_id": "s5", "prompt": "Name a bird.", "chosen": "A robin.", "rejected": "A bat."}])
    out = tmp_path / "s.jsonl"
    assert run(["score", "--rm", str(tiny_rm), "--data", data, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scored 2 pairs; skipped 3 records (duplicate: 1, empty answer: 1, identical answers: 1)" in printed
    rows = [strict_loads(line) for line in out.read_text().splitlines()]
    assert [(r["record"], r["input_id"]) for r in rows] == [(1, "s1"), (5, "s5")]
    rm, tok = load_reward_model(str(tiny_rm))
    r_c, r_r = score_pairs(rm, tok, ["Name a bird."], ["A robin."], ["A bat."], 64)
    # record 5's own rewards (up to batching round-off), not another record's
    assert (rows[1]["r_chosen"], rows[1]["r_rejected"]) == pytest.approx((r_c[0], r_r[0]), abs=1e-7)
    assert abs(rows[0]["r_chosen"] - rows[1]["r_chosen"]) > 1e-6
    skipped = [strict_loads(line) for line in (tmp_path / "s.skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"record": 2, "input_id": "s2", "reason": "duplicate", "duplicate_of": 1},
                       {"record": 3, "input_id": "s3", "reason": "identical answers"},
                       {"record": 4, "input_id": "s4", "reason": "empty answer"}]


def test_input_id_rule_and_record_numbers(tmp_path):
    # the first of id, sample_id, example_id, uid, prompt_id that holds a string or an integer
    f = write_jsonl(tmp_path / "u.jsonl", [
        {"prompt_id": "p", "uid": 7, "prompt": "q", "answer_a": "x", "answer_b": "y"},
        {"id": ["not", "an", "id"], "sample_id": "s", "prompt": "q2", "answer_a": "x", "answer_b": "y"},
        {"prompt": "q3", "answer_a": "x", "answer_b": "y"}])
    loaded = load_records(f, labelled=False)
    assert (loaded.records, loaded.input_ids) == ([1, 2, 3], [7, "s", None])
    j = tmp_path / "l.json"  # a JSON list: the record number is the list index, as in its error messages
    j.write_text(json.dumps([qa(0, id="a"), qa(0, id="b"), qa(1, id="c")]))
    loaded = load_records(str(j))
    assert (loaded.records, loaded.input_ids) == ([0, 2], ["a", "c"])
    assert loaded.skipped == [{"record": 1, "input_id": "b", "reason": "duplicate", "duplicate_of": 0}]


def test_join_back_case_file(tiny_rm, tmp_path):
    out = tmp_path / "s.jsonl"
    result = run_score(str(tiny_rm), case("join_back.jsonl"), out)
    assert result["scored"] == 2 and result["skipped"] == {"duplicate": 1, "identical answers": 1, "empty answer": 1}
    assert [strict_loads(x)["input_id"] for x in out.read_text().splitlines()] == ["s1", "s5"]
