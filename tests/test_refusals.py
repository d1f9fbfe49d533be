"""Inputs that must be refused before any work or write: command-line values out of range, --out paths that are
not a new file, run directories that hold another run, settings outside their interval, records whose meaning is
ambiguous (a key twice, two formats in one file, an id twice), and saved directories that are not what they claim.
Each case is checked in-process (milliseconds); tests/test_hostile_inputs.py checks the CLI's exit code and single
error line for the same `UserError`s."""

import json
import os
import re
import stat

import pytest

from ser.checkpoint import (EARLY_RUN_FILES, atomic_dir, atomic_write_text, check_out_file, check_resumable,
                            refuse_existing_run, run_kind)
from ser.cli import build_parser, run
from ser.config import load_config
from ser.data import load_pairs, load_records, load_unlabelled
from ser.errors import UserError

GOOD = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]


def write_jsonl(path, records):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return str(path)


# ---------------------------------------------------------------- 1. command-line values


@pytest.mark.parametrize("argv, needle", [
    (["score", "--rm", "r", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["score", "--rm", "r", "--data", "d", "--out", "o", "--batch-size", "-2"], "--batch-size: must be >= 1, got -2"),
    (["eval", "--rm", "r", "--data", "d", "--limit", "0"], "--limit: must be >= 1, got 0"),
    (["eval", "--rm", "r", "--data", "d", "--limit", "x"], "--limit: expected an integer >= 1, got 'x'"),
    (["generate-pairs", "--policy", "p", "--prompts", "d", "--out", "o", "--max-new-tokens", "-5"],
     "--max-new-tokens: must be >= 1, got -5"),
    (["judge", "--a", "a", "--b", "b", "--prompts", "d", "--judge", "j", "--out", "o", "--tie-margin", "-1"],
     "--tie-margin: must be a finite number >= 0, got -1"),
    (["judge", "--a", "a", "--b", "b", "--prompts", "d", "--judge", "j", "--out", "o", "--tie-margin", "nan"],
     "--tie-margin: must be a finite number >= 0, got nan"),
    (["generate-pairs", "--policy", "p", "--prompts", "d", "--out", "o", "--seed", str(2**64)],
     "--seed: expected an integer in [0, 2**32), got '18446744073709551616'"),  # torch.manual_seed overflowed
    (["judge", "--a", "a", "--b", "b", "--prompts", "d", "--judge", "j", "--out", "o", "--seed", "-1"],
     "--seed: expected an integer in [0, 2**32), got '-1'"),
])
def test_out_of_range_arguments_exit_2_naming_the_option(argv, needle, capsys):
    """A batch size of -2 used to score every pair 0.0 (an empty range of batches) and exit 0."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_curve_with_no_sizes_is_an_error(tmp_path):
    with pytest.raises(UserError, match="names nothing to train"):
        run(["curve", "--out", str(tmp_path / "c"), "--sizes", ","])
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- 2. --out of `ser score` / `generate-pairs` / `judge`


def test_out_file_must_be_a_new_file_name(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("x\n")
    (tmp_path / "sub").mkdir()
    for out, needle in [(tmp_path / "sub", "is a directory"), (f"{tmp_path}/new/", "is a directory"),
                        (".", "is a directory"), (data / "x.jsonl", "is a file, not a directory"),
                        (data, "would overwrite the input")]:
        with pytest.raises(UserError, match=needle):
            check_out_file(out, str(data), "hh-rlhf:helpful-base")
    assert data.read_text() == "x\n"
    assert check_out_file(tmp_path / "a" / "b" / "scores.jsonl", str(data)) == tmp_path / "a" / "b" / "scores.jsonl"
    rm = make_run(tmp_path / "rm", "model.safetensors")  # --out inside the reward model read by the same command
    with pytest.raises(UserError, match="would overwrite the input"):
        check_out_file(rm / "model.safetensors", str(data), str(rm))


def test_generate_pairs_and_judge_refuse_to_overwrite_their_prompts(tmp_path):
    from ser.judge import generate_pairs, judge

    data = write_jsonl(tmp_path / "prompts.jsonl", GOOD)
    with pytest.raises(UserError, match="would overwrite the input"):
        generate_pairs("no-policy", None, data, data)
    with pytest.raises(UserError, match="would overwrite the input"):
        judge("no-a", "no-b", data, str(tmp_path / "no-rm"), data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


@pytest.mark.parametrize("out", [".", "/", ""])
def test_score_and_judge_refuse_a_directory_out_before_naming_its_side_file(out, tmp_path):
    """`ser score --out .` crashed with a ValueError traceback: the side file's name (OUT.skipped.jsonl,
    OUT.summary.json) was made before OUT itself was checked, and "." has no name to give a suffix."""
    from ser.judge import judge
    from ser.pipeline import run_score

    data = write_jsonl(tmp_path / "prompts.jsonl", GOOD)
    with pytest.raises(UserError, match="is a directory"):
        run_score(str(tmp_path / "no-rm"), str(data), out)
    with pytest.raises(UserError, match="is a directory"):
        judge("no-a", "no-b", str(data), str(tmp_path / "no-rm"), out)


def test_an_out_file_inside_a_run_is_refused_another_file_is_replaced_with_a_warning(tmp_path, caplog):
    """`ser score runs/t/metrics.jsonl` replaced a training run's metrics: a file inside a run directory (one that
    `start_run` marked, at any depth) is refused; an ordinary existing file is replaced, and the log says so."""
    from ser.checkpoint import start_run

    start_run(tmp_path / "run", "train-rm", "{}\n")
    for out in (tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "rm" / "scores.jsonl"):
        with pytest.raises(UserError, match=r"inside the train-rm run .*run, whose files it could replace"):
            check_out_file(out)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "command").write_text("make coffee\n")  # a file of that name that no run wrote
    mine = tmp_path / "notes" / "scores.jsonl"
    mine.write_text("old\n")
    with caplog.at_level("WARNING"):
        assert check_out_file(mine) == mine
    assert "exists: replacing it" in caplog.text


def test_out_file_may_not_be_a_known_dataset_file(shared_data):
    from ser.data import local_path

    path = local_path("hh-rlhf:helpful-base")
    assert path and path.startswith(str(shared_data)) and local_path("nobody/no-such-dataset") is None
    with pytest.raises(UserError, match="would overwrite the input"):
        check_out_file(path, path)


def test_score_refuses_to_overwrite_its_input(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    before = open(data).read()
    with pytest.raises(UserError, match="would overwrite the input"):
        run(["score", "--rm", str(tmp_path / "no-rm"), "--data", data, "--out", data])
    assert open(data).read() == before and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


# ---------------------------------------------------------------- 3. run directories


def make_run(d, *names):
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).mkdir() if name.endswith("/") else (d / name).write_text("x")
    return d


def test_run_kind_from_the_files_each_command_writes(tmp_path):
    assert run_kind(make_run(tmp_path / "rm", "config.yaml", "result.json", "rm/")) == "train-rm"
    assert run_kind(make_run(tmp_path / "ev", "config.yaml", "state.json")) == "evolve"
    assert run_kind(make_run(tmp_path / "ev0", "config.yaml", "folds/")) == "evolve"  # killed during iteration 0
    assert run_kind(make_run(tmp_path / "ppo", "config.yaml", "checkpoint/ppo_state.pt")) == "ppo"
    assert run_kind(make_run(tmp_path / "new", "config.yaml", "data_hash")) is None


def test_a_new_run_never_writes_into_another_run(tmp_path):
    for d in (make_run(tmp_path / "a", "config.yaml", "result.json", "rm/"),  # a finished train-rm run
              make_run(tmp_path / "b", "config.yaml", "state.json"),  # an evolve run
              make_run(tmp_path / "c", "rm/"),  # a directory with an `rm` folder of the user's
              make_run(tmp_path / "d", "config.yaml", "notes.txt")):  # a config.yaml beside the user's files
        with pytest.raises(UserError, match=f"{d}: already holds a run; (`ser .* )?--resume {d}`? continues it"):
            refuse_existing_run(d)
    with pytest.raises(UserError, match=f"already holds a run; `ser evolve --resume {tmp_path / 'b'}` continues it"):
        refuse_existing_run(tmp_path / "b")
    # a run that stopped before its first checkpoint starts over; so does an empty or a new directory
    refuse_existing_run(make_run(tmp_path / "e", *EARLY_RUN_FILES))
    refuse_existing_run(make_run(tmp_path / "f"))
    refuse_existing_run(tmp_path / "g")


def test_train_rm_leaves_a_finished_run_intact(tmp_path):
    """A config error (or any error) used to come after OUT's rm/ and result.json were deleted."""
    from ser.pipeline import run_train_rm

    old = make_run(tmp_path / "old", "config.yaml", "result.json", "rm/model.safetensors")
    cfg = load_config(None, [f"data.train={write_jsonl(tmp_path / 'd.jsonl', GOOD)}", "data.test_size=2"])
    with pytest.raises(UserError, match="already holds a run"):
        run_train_rm(cfg, old)
    assert sorted(p.name for p in old.iterdir()) == ["config.yaml", "result.json", "rm"]


def test_a_run_that_stopped_early_starts_over_clean(tmp_path):
    """What a run killed before its first checkpoint leaves may be started over: its old metrics go, and the
    command it was started with is recorded; another process's temporary files never count as a run."""
    from ser.checkpoint import start_run

    d = make_run(tmp_path / "early", "config.yaml", "data_hash", ".data_hash.ab12.tmp", ".write-probe-x")
    (d / "metrics.jsonl").write_text('{"step": 1, "OLD_RUN": true}\n')
    refuse_existing_run(d)
    start_run(d, "train-rm", "train: {}\n")
    assert not (d / "metrics.jsonl").exists() and run_kind(d) == "train-rm"
    refuse_existing_run(d)  # still only early files: a second attempt may start over too
    with pytest.raises(UserError, match="a `ser train-rm` run, not a `ser evolve` run"):
        check_resumable(d, "evolve")  # before its first checkpoint, told apart by its command file


def test_resume_names_the_kind_of_run_it_was_given(tmp_path):
    rm_run = make_run(tmp_path / "rm", "config.yaml", "result.json", "rm/")
    with pytest.raises(UserError, match="a `ser train-rm` run, not a `ser evolve` run"):
        check_resumable(rm_run, "evolve")
    with pytest.raises(UserError, match="not a `ser ppo` run directory \\(no config.yaml\\)"):
        check_resumable(make_run(tmp_path / "empty"), "ppo")
    assert check_resumable(make_run(tmp_path / "ev", "config.yaml", "state.json"), "evolve") == tmp_path / "ev"


@pytest.mark.parametrize("command", ["train-rm", "evolve", "ppo"])
def test_resume_with_another_out_is_refused(tmp_path, command):
    """--resume continues in the run's own directory: an --out beside it would be ignored, so it is an error."""
    with pytest.raises(UserError, match="--resume continues a run in its own directory; drop --out"):
        run([command, "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("override, needle", [("data.test_size=0", "no test pairs to evaluate on"),
                                             ("data.seed_size=0", "no human-labelled pairs to train on")])
def test_an_empty_seed_or_test_split_is_an_error_before_anything_is_written(tmp_path, override, needle):
    """Both used to write config.yaml and data_hash first; an empty test split then 'passed' with accuracy nan."""
    from ser.evolve import run_evolve
    from ser.pipeline import run_train_rm

    cfg = load_config(None, [f"data.train={write_jsonl(tmp_path / 'd.jsonl', GOOD)}", "data.test_size=2", override])
    for job in (run_train_rm, run_evolve):
        with pytest.raises(UserError, match=needle):
            job(cfg, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_an_experiment_reuses_results_only_made_with_its_settings(tmp_path):
    """`ser experiment` reuses a directory's seed RMs, baselines and runs: only with the same data, model, train
    and ser settings (seeds and methods may grow); results of unknown settings are not reused."""
    from ser.experiment import check_same_settings, run_experiment

    cfg = load_config(None, ["experiment.seeds=[0]"])
    (tmp_path / "exp").mkdir()
    check_same_settings(tmp_path / "exp", cfg)
    assert (tmp_path / "exp" / "settings.json").exists()
    check_same_settings(tmp_path / "exp", load_config(None, ["experiment.seeds=[0, 1]", "experiment.methods=[ssrm]"]))
    with pytest.raises(UserError, match="made with other settings"):
        check_same_settings(tmp_path / "exp", load_config(None, ["data.seed_size=0.02"]))
    with pytest.raises(UserError, match="made with other settings"):  # the method runs made would keep theirs
        check_same_settings(tmp_path / "exp", load_config(None, ["ser.max_iterations=5"]))
    (tmp_path / "old" / "seed0").mkdir(parents=True)
    with pytest.raises(UserError, match="without a settings.json"):
        check_same_settings(tmp_path / "old", cfg)
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"prompt": "q", "answer_a": "a", "answer_b": "b"}])
    with pytest.raises(UserError, match="full_label, which trains on the pool's human labels"):
        run_experiment(load_config(None, [f"data.pool={pool}"]), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_corrupt_state_json_is_an_error_naming_it(tmp_path):
    from ser.evolve import load_state

    for text in ("{bad", "[]", '{"completed": "one"}', '{"nope": 1}'):
        (tmp_path / "state.json").write_text(text)
        with pytest.raises(UserError, match=f"{tmp_path / 'state.json'}: corrupt"):
            load_state(tmp_path)


def test_files_get_the_mode_the_umask_gives(tmp_path):
    """mkstemp/mkdtemp create 0600/0700: every file ser wrote was unreadable to the user's group."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


# ---------------------------------------------------------------- 4. settings


@pytest.mark.parametrize("override, needle", [
    ("train.weight_decay=-1", "'train.weight_decay' must lie in [0, ∞), got -1.0"),
    ("train.warmup_ratio=5", "'train.warmup_ratio' must lie in [0, 1], got 5.0"),
    ("train.max_grad_norm=-1", "'train.max_grad_norm' must lie in [0, ∞)"),
    ("train.seed=-1", "'train.seed' must lie in [0, 4294967295], got -1"),
    ("model.lora_r=0", "'model.lora_r' must lie in [1, ∞), got 0"),
    ("model.lora_dropout=2", "'model.lora_dropout' must lie in [0, 1), got 2.0"),
    ("ser.max_iterations=-1", "'ser.max_iterations' must lie in [0, ∞), got -1"),
    ("ser.iteration_epochs=0", "'ser.iteration_epochs' must lie in (0, ∞), got 0.0"),
    ("ser.tau_delta=5", "'ser.tau_delta' must lie in (0, 1], got 5.0"),
    # |p_a - p_b| >= 0 holds for a tie: tau_delta 0 labelled exact ties by answer position
    ("ser.tau_delta=0", "'ser.tau_delta' must lie in (0, 1], got 0.0"),
    # max(0, 0 - d) is minimal for an RM that scores every answer alike
    ("train.loss=hinge", "'train.margin' must be > 0 with the hinge loss, got 0.0"),
    ("ser.pseudo_loss=hinge ser.pseudo_margin=0", "'ser.pseudo_margin' must be > 0 with the hinge loss, got 0.0"),
    ("train.margin=-1", "'train.margin' must be >= 0, got -1.0"),
    ("ser.ssrm_threshold=2", "'ser.ssrm_threshold' must lie in [0.5, 1], got 2.0"),
    # one fold model has no out-of-fold pair; the ensemble rule needs k >= 2 voters
    ("ser.folds=1", "'ser.folds' must be 0 or >= 2, and >= 2 with 'ser.rule=ensemble'"),
    ("ser.rule=ensemble", "got rule=ensemble, folds=0"),
    ("ser.folds=2 ser.restart=true", "'ser.folds' with rule=paper needs 'ser.restart: false'"),
    ("ser.folds=2 ser.validation=8", "validates out of fold and 'ser.validation' on a hold-out: set one of them"),
    ("policy.temperature=0", "'policy.temperature' must lie in (0, ∞), got 0.0"),
    ("policy.top_k=-1", "'policy.top_k' must lie in [0, ∞), got -1"),
    ("policy.top_p=0", "'policy.top_p' must lie in (0, 1], got 0.0"),
    ("ppo.lr=-1", "'ppo.lr' must lie in (0, ∞), got -1.0"),
    ("ppo.lam=2", "'ppo.lam' must lie in [0, 1], got 2.0"),
    ("experiment.bootstrap=0", "'experiment.bootstrap' must lie in [1, ∞), got 0"),
    ("experiment.seeds=[]", "'experiment.seeds' must be a non-empty list of integers"),
    ("experiment.seeds=[a]", "'experiment.seeds' must be a non-empty list of integers"),
    ("experiment.seeds=[0,0]", "'experiment.seeds' names a seed twice: [0, 0]"),
    ("experiment.methods=[]", "'experiment.methods' must be a non-empty list"),
    ("data.columns={prompt: [q]}", "'data.columns' maps a field"),
    ("data.columns={prompt: q, chosen: x, rejected: y, bogus: lab}", "got 'bogus': 'lab'"),
])
def test_settings_outside_their_interval_name_the_key(override, needle):
    with pytest.raises(UserError) as e:
        load_config(None, override.split(" ") if " ser." in override else [override])
    assert needle in str(e.value)


def test_model_settings_that_do_not_fit_the_backbone_fail_before_any_write(tiny_bert_dir):
    from ser.config import ModelConfig
    from ser.models import check_backbone, load_reward_model

    with pytest.raises(UserError, match="'model.trainable_layers' must be between 1 and the backbone's 2 layers"):
        check_backbone(ModelConfig(backbone=str(tiny_bert_dir), mode="freeze", trainable_layers=100))
    with pytest.raises(UserError, match="'model.max_length' = 100000 exceeds the 512 positions"):
        check_backbone(ModelConfig(backbone=str(tiny_bert_dir), max_length=100000))
    check_backbone(ModelConfig(backbone=str(tiny_bert_dir), mode="freeze", trainable_layers=2, max_length=512))
    with pytest.raises(UserError, match="config: model.mode=lora on .*nosuch"):
        load_reward_model(str(tiny_bert_dir), "lora", {"targets": ["nosuch"]})


# ---------------------------------------------------------------- 5. records


def test_a_key_twice_in_a_record_is_an_error(tmp_path):
    """json.loads keeps the last value: the record would train on "z", not the "a" its author may have meant."""
    line = '{"prompt": "p", "chosen": "a", "chosen": "z", "rejected": "b"}\n'
    bad = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], line])
    with pytest.raises(UserError, match="d.jsonl:2: key 'chosen' appears twice in the record"):
        load_pairs(bad)
    (tmp_path / "d.json").write_text("[" + json.dumps(GOOD[0]) + ", " + line + "]")  # a .json record is its index: 1
    with pytest.raises(UserError, match="d.json:1: key 'chosen' appears twice in the record"):
        load_pairs(str(tmp_path / "d.json"))
    conv = '{"prompt": "p", "chosen": [{"role": "user", "role": "x"}], "rejected": "b"}'
    cases = {  # file text -> the message: the key the parser met first, and the record that holds it
        '{"data": [' + json.dumps(GOOD[0]) + ", " + conv + "]}": "n.json:1: key 'role' appears twice in the record",
        '{"data": [], "data": []}': "n.json: key 'data' appears twice in one object",  # outside any record
        '{"meta": {"a": 1, "a": 2}, "data": [' + line + "]}": "n.json: key 'a' appears twice in one object",
        "[" + line + ", {": "n.json: key 'chosen' appears twice in one object",  # malformed later: no index, no crash
        "[" + "[" * 600 + "1" + "]" * 600 + ", " + line + "]": "n.json:1: key 'chosen' appears twice in the record",
    }
    for text, message in cases.items():
        (tmp_path / "n.json").write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            load_pairs(str(tmp_path / "n.json"))
    (tmp_path / "m.json").write_text('[\n{"prompt": "p",\n')  # a .json error's line is not a record index
    with pytest.raises(UserError, match="m.json: line 3: malformed JSON"):
        load_pairs(str(tmp_path / "m.json"))


def test_one_file_holds_one_kind_of_record(tmp_path):
    """A labelled record in an unlabelled file used to be scored as r_a/r_b in hash order, its label lost."""
    unl = {"prompt": "p", "answer_a": "a", "answer_b": "b"}
    mixed = write_jsonl(tmp_path / "m.jsonl", [unl, GOOD[0]])
    with pytest.raises(UserError, match="m.jsonl:2: a labelled \\(chosen/rejected\\) record, but record 1 is an "
                                        "unlabelled \\(answer_a/answer_b\\) one; one file holds one kind"):
        load_unlabelled(mixed)
    mixed = write_jsonl(tmp_path / "n.jsonl", [GOOD[0], GOOD[1], unl])
    with pytest.raises(UserError, match="n.jsonl:3: an unlabelled \\(answer_a/answer_b\\) record, but record 1 is a "
                                        "labelled"):
        load_records(mixed, labelled=False)
    both = write_jsonl(tmp_path / "b.jsonl", [{**unl, "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match="b.jsonl:1: the record has both answer_a/answer_b .* and chosen/rejected"):
        load_pairs(both)


def test_pandalm_answer_that_is_not_a_number_is_an_error(tmp_path):
    rec = '{"instruction": "i", "input": "", "response1": NaN, "response2": "b", "annotator1": 1, ' \
          '"annotator2": 1, "annotator3": 1}\n'
    with pytest.raises(UserError, match="p.jsonl:1: field 'response1' is nan, expected a string"):
        load_pairs(write_jsonl(tmp_path / "p.jsonl", [rec]))


def test_score_warns_of_shared_ids_and_joins_back_on_record(tmp_path, tiny_bert_dir, caplog):
    """Several pairs per prompt share a prompt_id by design: a warning, and every row carries its `record`."""
    from ser.checkpoint import save_reward_model
    from ser.models import load_reward_model

    rm = save_reward_model(*load_reward_model(str(tiny_bert_dir)), tmp_path / "rm", {})
    data = write_jsonl(tmp_path / "ids.jsonl", [{**GOOD[0], "prompt_id": "A"}, {**GOOD[1], "prompt_id": "B"},
                                                 {**GOOD[2], "prompt_id": "A"}])
    assert run(["score", "--rm", str(rm), "--data", data, "--out", str(tmp_path / "s.jsonl")]) == 0
    assert "1 records share their id with an earlier record (first: record 3, id 'A', as record 1)" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(r["record"], r["input_id"]) for r in rows] == [(1, "A"), (2, "B"), (3, "A")]


def test_an_unreachable_hub_dataset_is_a_user_error():
    """HF_HUB_OFFLINE=1 (tests/conftest.py): the datasets library raises its own ConnectionError."""
    with pytest.raises(UserError, match="nobody/no-such-dataset: cannot load the Hub dataset"):
        load_pairs("nobody/no-such-dataset")


def test_hub_load_args_use_the_local_files_splits():
    """A known name asks the Hub for the split its local file is (HH: test; UltraFeedback: train), `:eval` of
    UltraFeedback for the Hub's held-out test split (it has no eval split); other ids default to train."""
    from ser.data import hub_load_args

    assert hub_load_args("hh-rlhf:helpful-base") == (("Anthropic/hh-rlhf",), {"data_dir": "helpful-base",
                                                                              "split": "test"})
    assert hub_load_args("hh-rlhf:helpful-base:train")[1]["split"] == "train"
    assert hub_load_args("ultrafeedback") == (("trl-lib/ultrafeedback_binarized",), {"data_dir": None,
                                                                                     "split": "train"})
    assert hub_load_args("ultrafeedback:eval")[1]["split"] == "test"
    assert hub_load_args("owner/name") == (("owner/name",), {"split": "train"})
    assert hub_load_args("owner/name:validation") == (("owner/name",), {"split": "validation"})


def test_pool_pairs_that_are_human_seed_pairs_are_removed(tmp_path, caplog):
    """A human-labelled pair must not be pseudo-labelled too (perhaps the other way)."""
    from ser.evolve import build_pool
    from ser.pipeline import load_splits

    cfg = load_config(None, [f"data.train={write_jsonl(tmp_path / 'd.jsonl', GOOD)}", "data.test_size=2",
                             "data.seed_size=6"])
    split = load_splits(cfg.data)
    pool_recs = [{"prompt": p.prompt, "answer_a": p.rejected, "answer_b": p.chosen} for p in split.seed[:2]]
    pool_recs += [{"prompt": "new", "answer_a": "x", "answer_b": "y"}]
    cfg.data.pool = write_jsonl(tmp_path / "pool.jsonl", pool_recs)
    pool, truth = build_pool(cfg, split)
    assert [p.prompt for p in pool] == ["new"] and truth is None
    assert "removed 2 of 3 pool" in caplog.text and "also appear in the human-labelled seed" in caplog.text


# ---------------------------------------------------------------- 6. saved directories


def test_a_backbone_is_not_a_reward_model(tiny_bert_dir):
    """transformers gives a backbone a random head: `ser eval` printed an accuracy of random rewards."""
    from ser.pipeline import load_saved_rm

    with pytest.raises(UserError, match="not a reward model: its weights have no reward head \\(classifier\\)"):
        load_saved_rm(tiny_bert_dir)


def test_corrupt_ser_config_json_is_an_error_naming_it(tmp_path, tiny_bert_dir):
    import shutil

    from ser.checkpoint import read_ser_config, save_reward_model
    from ser.models import load_reward_model
    from ser.pipeline import load_saved_rm

    rm, tok = load_reward_model(str(tiny_bert_dir))
    good = save_reward_model(rm, tok, tmp_path / "rm", {"config": {"model": {"max_length": 64}}})
    assert load_saved_rm(good)[2] == 64
    length = "corrupt \\(config.model.max_length must be an integer >= 1"
    for i, (text, needle) in enumerate([("{", "corrupt \\(JSONDecodeError"),
                                        ("[1, 2]", "corrupt \\(expected a JSON object"),
                                        ('{"config": {"model": {"max_length": "abc"}}}', length),
                                        ('{"config": {"model": {"max_length": 0}}}', length)]):
        d = tmp_path / f"bad{i}"
        shutil.copytree(good, d, ignore=shutil.ignore_patterns("manifest.json"))
        (d / "ser_config.json").write_text(text)
        with pytest.raises(UserError, match=f"{d / 'ser_config.json'}: {needle}"):
            read_ser_config(d) if i < 2 else load_saved_rm(d)


def test_float_and_date_ids_join_back():
    """Parquet/pandas ids: an integer column with a missing value is read as floats, a date column as dates."""
    import datetime

    from ser.data import _input_id

    assert _input_id({"id": 3.0}) == 3 and _input_id({"id": 2.5}) is None and _input_id({"id": float("nan")}) is None
    assert _input_id({"id": datetime.date(2026, 12, 2)}) == "2026-12-02"
    assert _input_id({"id": True, "uid": "u1"}) == "u1" and _input_id({"prompt": "p"}) is None


def test_config_file_details(tmp_path):
    """A quoted integer is a count (it read as the fraction 12.0); an empty file is refused, not all defaults."""
    (tmp_path / "q.yaml").write_text('data:\n  seed_size: "12"\n')
    assert load_config(tmp_path / "q.yaml").data.seed_size == 12
    (tmp_path / "e.yaml").write_text("# nothing set\n")
    with pytest.raises(UserError, match="e.yaml: no settings \\(an empty config file\\)"):
        load_config(tmp_path / "e.yaml")


def test_csv_blank_lines_before_the_header_are_skipped(tmp_path):
    (tmp_path / "b.csv").write_text("\n\nprompt,chosen,rejected\nq,a,b\n")
    assert [(p.prompt, p.chosen) for p in load_pairs(str(tmp_path / "b.csv"))] == [("q", "a")]


def test_csv_trailing_commas_in_the_header_are_dropped_as_in_the_rows(tmp_path):
    """Excel writes trailing commas: 'prompt,chosen,rejected,,' heads the same three columns as without them."""
    (tmp_path / "t.csv").write_text("prompt,chosen,rejected,,\nq,a,b\nq2,a2,b2,,\n")
    assert [(p.prompt, p.chosen, p.rejected) for p in load_pairs(str(tmp_path / "t.csv"))] == [("q", "a", "b"),
                                                                                                ("q2", "a2", "b2")]


def test_ctrl_c_says_how_to_go_on(tmp_path):
    from ser.cli import _resume_hint

    run = tmp_path / "r"
    run.mkdir()
    assert _resume_hint(["evolve", "--config", "c.yaml", "--out", str(run)]) == \
        f"; completed checkpoints are kept: ser evolve --resume {run}"
    assert _resume_hint(["-v", "train-rm", f"--out={run}"]).endswith(f"ser train-rm --resume {run}")
    assert _resume_hint(["ppo", "--resume", str(run)]).endswith(f"ser ppo --resume {run}")
    assert _resume_hint(["evolve", "--out", str(tmp_path / "not-made-yet")]) == ""  # stopped before any file
    assert _resume_hint(["experiment", "--out", str(run)]) == "; the same command again goes on from the finished runs"
    assert _resume_hint(["score", "--out", str(run / "s.jsonl")]) == ""


def test_a_run_directory_given_as_a_model_names_the_model_inside(tmp_path):
    from ser.models import resolve_backbone

    (tmp_path / "run" / "rm").mkdir(parents=True)
    (tmp_path / "run" / "rm" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"run: not a model directory \(no config.json\); the run's reward model is "
                                        r".*run/rm$"):
        resolve_backbone(str(tmp_path / "run"))
