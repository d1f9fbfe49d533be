"""The SER loop end to end on real HH-RLHF pairs with a tiny random backbone: files, keys, determinism,
the label firewall, unlabelled pools and resume after kill -9 (of `ser evolve` and `ser train-rm`)."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import LOWER_PRIORITY
from safetensors.torch import load_file

from ser.checkpoint import atomic_write_bytes
from ser.config import load_config
from ser.crossfit import choose_iteration
from ser.evolve import State, run_evolve

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(backbone, data_file=None, **extra):
    o = [f"model.backbone={backbone}", "model.max_length=64", "data.seed_size=32", "data.pool_size=64",
         "data.test_size=32", "train.batch_size=8", "train.lr=1e-3", "train.epochs=2", "ser.max_iterations=2",
         "ser.min_pairs=4", "ser.calibration=center",
         # a tiny random RM is barely confident: narrow thresholds so that it selects pairs
         "ser.tau_high=0.500001", "ser.tau_low=0.499999", "ser.tau_delta=0.000001"]
    if data_file:
        o.append(f"data.train={data_file}")
    return o + [f"{k}={v}" for k, v in extra.items()]


def records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def iteration_records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records(run) if "rm/acc" in r]


def test_evolve_files_keys_and_determinism(tiny_bert_dir, shared_data, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir))
    a = run_evolve(cfg, str(tmp_path / "a"))
    b = run_evolve(cfg, str(tmp_path / "b"))
    for it in range(len(iteration_records(a))):
        assert (a / "iterations" / str(it) / "model.safetensors").exists()
    assert (a / "final" / "config.json").exists() and (a / "config.yaml").exists()
    rows = iteration_records(a)
    assert rows[0]["iteration"] == 0 and "ser/status" not in rows[0] and len(rows) >= 2  # the keys below are checked
    for r in rows[1:]:
        for key in ("ser/status", "ser/n_status1", "ser/n_status2", "ser/added", "ser/pool_left",
                    "ser/pseudo_precision", "ser/expected_precision", "rm/acc", "rm/ece", "train/pairs",
                    "bias/seed_longer_chosen", "bias/pseudo_longer_chosen", "bias/test_length_corr",
                    "bias/test_acc_chosen_longer", "bias/test_acc_chosen_shorter"):
            assert key in r, key
    assert any("ser/stop_reason" in r for r in records(a))
    assert rows == iteration_records(b)  # same seed, same metrics


def test_length_audit_and_guard_hand_example():
    """Seed: chosen longer in 1 of 2 pairs (share 0.5). Accepted pseudo-labels: 3 of 4 pairs, all three with the
    longer answer chosen (share 1.0). The guard keeps the accepted set at the seed's share: with no shorter-chosen
    pair accepted, every longer-chosen one goes; the unaccepted pair stays out."""
    from ser.data import Pair, UnlabelledPair
    from ser.evolve import length_audit

    seed = [Pair("s1", "q", "long answer", "short", "x"), Pair("s2", "q", "no", "a longer one", "x")]
    pool = [UnlabelledPair(f"p{i}", "q", a, b, "x") for i, (a, b) in
            enumerate([("aaaa", "b"), ("a", "bbbb"), ("aaa", "bb"), ("a", "bb")])]
    take, a_wins, target = np.array([True, True, True, False]), np.array([True, False, True, False]), np.ones(4)
    kept, rec = length_audit(take, a_wins, target, pool, seed, guard=False)
    assert (kept == take).all() and rec == {"bias/seed_longer_chosen": 0.5, "bias/pseudo_longer_chosen": 1.0}
    kept, rec = length_audit(take, a_wins, target, pool, seed, guard=True)
    assert not kept.any() and rec["bias/guard_dropped"] == 3
    # one shorter-chosen pair accepted (pair 3: A "a" chosen over "bb"): the guard keeps it and the single most
    # confident longer-chosen pair (share 1/2 = the seed's); confidence is P of the labelled direction
    take, a_wins, target = np.ones(4, bool), np.array([True, False, True, True]), np.array([0.95, 0.73, 0.88, 0.62])
    kept, rec = length_audit(take, a_wins, target, pool, seed, guard=True)
    assert kept.tolist() == [True, False, False, True] and rec["bias/pseudo_longer_chosen"] == 0.5
    # an ensemble majority can label a pair against its mean margin (P 0.395 < 0.5): step 4b ranks it as the least
    # confident of the three longer-chosen pairs (0, 1, 2), not the most (|0.395 - 0.5| = 0.105 would outrank
    # pair 2's |0.6 - 0.5| = 0.1); the one kept beside shorter-chosen pair 3 is pair 2
    from ser.config import SERConfig
    from ser.evolve import trim_and_guard

    sel = {"take": take, "a_wins": a_wins, "target": np.array([0.395, 0.58, 0.6, 0.7])}
    kept, _ = trim_and_guard(sel, pool, seed, SERConfig(length_guard=True))
    assert kept.tolist() == [False, False, True, True]


def test_stop_after_is_decided_from_the_committed_state_and_again_on_resume(tmp_path):
    """The loop stops after an iteration when the pool is empty or validation did not improve for ser.patience
    iterations. Scores [0.60, 0.70, 0.65], patience 1: iteration 1 is the best and iteration 2 one without a gain:
    stop (best 1). [0.60, 0.70]: go on. A run killed after committing iteration 2 but before recording the stop
    (stopped: None on disk) stops on resume without training iteration 3."""
    from types import SimpleNamespace

    from ser.config import SERConfig
    from ser.data import UnlabelledPair
    from ser.evolve import evolve, stop_after

    s, pool = SERConfig(patience=1), [UnlabelledPair("p0", "q", "a", "b", "x")]
    state = State(completed=2, val_score=[0.60, 0.70, 0.65])
    assert stop_after(2, pool, state, s) == ("iteration 2: validation log-likelihood did not improve for 1 "
                                             "iteration(s) (best: iteration 1)")
    assert stop_after(1, pool, State(completed=1, val_score=[0.60, 0.70]), s) is None
    assert stop_after(1, [], State(completed=1, val_score=[0.60, 0.70]), s) == "iteration 1: the pool is empty"
    assert stop_after(1, pool, State(completed=1), s) is None  # no validation: only the pool and max_iterations stop
    cfg = load_config(None, ["ser.max_iterations=5"])
    split = SimpleNamespace(seed=[], test=[])
    # accelerator None: any training, scoring or writing would fail
    out = evolve(cfg, tmp_path, split, pool, None, state, accelerator=None)
    assert out.stopped.startswith("iteration 2: validation") and out.completed == 2


def test_fold_training_pairs_and_finite_margins():
    """Fold j trains on the seed outside fold j (iteration 0, or with ser.keep_seed), then the pseudo-labels;
    non-finite margins are 0 (no preference)."""
    from ser.data import Pair
    from ser.evolve import finite_margins, fold_training_pairs

    seed = [Pair(f"s{i}", "q", "c", "r", "x") for i in range(4)]
    pseudo = [Pair("p0", "q", "c", "r", "x")]
    folds = np.array([0, 1, 0, 1])
    assert [p.id for p in fold_training_pairs(seed, folds, 0, pseudo, True)] == ["s1", "s3", "p0"]
    assert [p.id for p in fold_training_pairs(seed, folds, 1, pseudo, False)] == ["p0"]
    m = finite_margins(np.array([1.0, np.inf, np.nan, 2.0, -np.inf]), np.array([0.5, 0.0, 0.0, np.inf, 1.0]))
    assert m.tolist() == [0.5, 0.0, 0.0, 0.0, 0.0]


def test_trim_and_guard_repeat_until_neither_removes_a_pair():
    """Target 0.8, seed share 0.5. Selected: pairs 0 and 1 longer-chosen (P 0.95, 0.9), pair 2 shorter-chosen
    (0.6). Trim: mean 0.817 keeps all three. Guard: share 2/3 > 0.5 drops the less sure longer-chosen pair (0.9),
    leaving mean (0.95 + 0.6) / 2 = 0.775 < 0.8. Trim again: {0.95}. Guard again: share 1 > 0.5 drops it. Nothing
    is left: 1 pair trimmed, 2 dropped by the guard; the stop message names both."""
    import dataclasses

    from ser.config import SERConfig
    from ser.data import Pair, UnlabelledPair
    from ser.evolve import stop_message, trim_and_guard

    seed = [Pair("s1", "q", "long answer", "short", "x"), Pair("s2", "q", "no", "a longer one", "x")]
    pool = [UnlabelledPair(f"p{i}", "q", a, b, "x") for i, (a, b) in enumerate([("aaaa", "b"), ("a", "bbbb"),
                                                                                  ("a", "bb")])]
    sel = {"take": np.ones(3, bool), "a_wins": np.array([True, False, True]), "target": np.array([0.95, 0.9, 0.6])}
    s = SERConfig(target_precision=0.8, length_guard=True)
    take, rec = trim_and_guard(sel, pool, seed, s)
    assert not take.any() and rec["ser/precision_trimmed"] == 1 and rec["bias/guard_dropped"] == 2
    cfg = load_config(None, [])
    cfg = dataclasses.replace(cfg, ser=s)
    msg = stop_message(cfg, 3, {**rec, "ser/added": 0})
    assert msg == ("iteration 3: none of the 3 selected pairs is left: ser.target_precision=0.8 trimmed 1 and the "
                   "length guard dropped 2")
    # without the guard the first trim is final: all three (mean 0.817); without the target the guard alone
    take, rec = trim_and_guard(sel, pool, seed, dataclasses.replace(s, length_guard=False))
    assert take.all() and rec["ser/precision_trimmed"] == 0 and "bias/guard_dropped" not in rec
    take, rec = trim_and_guard(sel, pool, seed, dataclasses.replace(s, target_precision=0.0))
    assert take.tolist() == [True, False, True] and rec["bias/guard_dropped"] == 1
    assert "ser/precision_trimmed" not in rec


def _pool_ids(cfg):
    from ser.pipeline import load_splits

    return {p.id for p in load_splits(cfg.data).pool}


def test_firewall_hidden_labels_change_audit_not_weights(tiny_bert_dir, shared_data, tmp_path):
    """Flip the human labels of every pool pair in the input file: the split, the selection and every trained
    weight stay the same; only the audit (pseudo-label precision) changes."""
    from ser.data import load_pairs

    src = shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    lines = gzip.open(src, "rt").read().splitlines()[:400]
    original = tmp_path / "orig.jsonl"
    original.write_text("\n".join(lines) + "\n")
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, original))
    pool = _pool_ids(cfg)
    ids = [p.id for p in load_pairs(str(original))]
    assert len(ids) == len(set(ids))
    cfg_f = load_config(None, tiny_overrides(tiny_bert_dir, flipped_copy(lines, pool, tmp_path)))
    assert _pool_ids(cfg_f) == pool
    a = run_evolve(cfg, str(tmp_path / "a"))
    b = run_evolve(cfg_f, str(tmp_path / "b"))
    ra, rb = iteration_records(a), iteration_records(b)
    assert [r.get("ser/added") for r in ra] == [r.get("ser/added") for r in rb]
    assert len(ra) > 1 and ra[1]["ser/added"] > 0
    for r1, r2 in zip(ra[1:], rb[1:]):
        assert r1["ser/pseudo_precision"] == pytest.approx(1 - r2["ser/pseudo_precision"])
    for it in range(len(ra)):
        wa = load_file(a / "iterations" / str(it) / "model.safetensors")
        wb = load_file(b / "iterations" / str(it) / "model.safetensors")
        assert all((wa[k] == wb[k]).all() for k in wa)


def flipped_copy(lines: list[str], ids: set, tmp_path: Path) -> Path:
    """tmp_path/flipped.jsonl: the raw HH-RLHF records `lines` with chosen and rejected swapped where the pair's id
    (label-invariant) is in `ids`."""
    out = []
    for line in lines:
        r = json.loads(line)
        if load_pairs_line(r, tmp_path) in ids:
            r = {"chosen": r["rejected"], "rejected": r["chosen"]}
        out.append(json.dumps(r))
    path = tmp_path / "flipped.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


def load_pairs_line(record, tmp_path):
    """The id ser gives one raw HH-RLHF record (through the real loader)."""
    from ser.data import load_pairs

    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps(record) + "\n")
    try:
        return load_pairs(str(f))[0].id
    except Exception:
        return None


def test_unlabelled_pool_file(tiny_bert_dir, shared_data, tmp_path):
    from ser.data import hide_labels, load_pairs

    unlabelled, _ = hide_labels(load_pairs("hh-rlhf:helpful-online", limit=80))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": p.prompt, "answer_a": p.answer_a, "answer_b": p.answer_b}) + "\n"
                            for p in unlabelled))
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, **{"data.pool": str(pool), "ser.max_iterations": 1}))
    run = run_evolve(cfg, str(tmp_path / "run"))
    assert [r["ser/pool"] for r in records(run) if "ser/pool" in r][:1] == [80]  # iteration 1 labelled the file
    assert not any("ser/pseudo_precision" in r or "audit/precision_by_decile" in r for r in records(run))  # no truth


def _ser(args, nice: bool = False):
    """`ser ARGS` started; nice: a run to be killed at a polled point (`conftest.LOWER_PRIORITY`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*(LOWER_PRIORITY if nice else []), sys.executable, "-m", "ser", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"process ended before the kill point:\n{proc.stdout.read()}"
        assert time.time() - t0 < timeout
        time.sleep(0.005)


@pytest.fixture(scope="module")
def evolve_reference(tiny_bert_dir, shared_data, tmp_path_factory) -> Path:
    """One uninterrupted `ser evolve` run, the reference of every kill point below."""
    ref = tmp_path_factory.mktemp("evolve") / "ref"
    p = _ser(["evolve", "--out", str(ref), *[f"--{o}" for o in tiny_overrides(tiny_bert_dir)]])
    assert p.wait() == 0, p.stdout.read()
    return ref


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "votes" / "0.npz"
    atomic_write_bytes(target, b"old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new, half-written")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["0.npz"]
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["0.npz"]


def test_an_atomic_write_fsyncs_its_directory_where_the_filesystem_allows(tmp_path, monkeypatch):
    """The rename is made durable (the directory fsync'd after the file); a filesystem that refuses to fsync a
    directory (EINVAL on some network filesystems) still gets the file, atomically."""
    import errno
    import stat

    calls, real = [], os.fsync

    def fsync(fd):
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        if calls[-1] == "dir":
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_bytes(tmp_path / "state.json", b"{}")
    assert calls == ["file", "dir"] and (tmp_path / "state.json").read_bytes() == b"{}"


def test_a_checkpoint_caught_between_its_two_renames_is_restored_on_resume(tmp_path, monkeypatch):
    """atomic_dir replaces checkpoint/ by renaming it to .checkpoint.old, then the new one in; stopped between
    the two (here: the second rename raises), only .checkpoint.old is left. Resuming restores it (it is the
    complete previous version), so the run goes on from it instead of from step 0."""
    from ser.checkpoint import atomic_dir, check_resumable, restore_swapped

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    with atomic_dir(run / "checkpoint") as tmp:
        (tmp / "step.json").write_text('{"step": 3}')
    calls, real = [], os.replace

    def killed_at_the_second_rename(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(run / "checkpoint") as tmp:
            (tmp / "step.json").write_text('{"step": 6}')
    monkeypatch.undo()
    assert not (run / "checkpoint").exists() and (run / ".checkpoint.old" / "step.json").exists()
    check_resumable(run, "train-rm")
    assert json.loads((run / "checkpoint" / "step.json").read_text()) == {"step": 3}
    assert not (run / ".checkpoint.old").exists()
    # what other kills leave is removed on resume: temporary files and directories (never complete) and an .old
    # whose replacement is in place; an .old without one is not debris
    debris = [run / ".metrics.jsonl.x1.tmp", run / "checkpoint" / ".train_state.pt.x2.tmp",
              run / ".checkpoint.x3.tmp" / "train_state.pt", run / "sub" / ".a.old" / "b"]
    for f in debris + [run / "sub" / "a" / "b", run / "sub" / ".c.old" / "d"]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    check_resumable(run, "train-rm")
    assert not any(f.exists() for f in debris) and not (run / ".checkpoint.x3.tmp").exists()
    assert (run / "sub" / "a" / "b").exists() and (run / "sub" / ".c.old" / "d").exists()
    assert json.loads((run / "checkpoint" / "step.json").read_text()) == {"step": 3}
    assert restore_swapped(run / "checkpoint") == run / "checkpoint"  # nothing to restore: unchanged
    # several processes of one run restore at once: the one that loses the race finds the rename done, not an error
    os.rename(run / "checkpoint", run / ".checkpoint.old")

    def another_process_renamed_first(a, b):
        real(a, b)
        raise FileNotFoundError(a)

    monkeypatch.setattr(os, "replace", another_process_renamed_first)
    assert restore_swapped(run / "checkpoint") == run / "checkpoint"
    monkeypatch.undo()
    assert json.loads((run / "checkpoint" / "step.json").read_text()) == {"step": 3}


# after_seed_commit: iteration 0 is committed and iteration 1 is scoring the pool
@pytest.mark.parametrize("kill_point", ["after_seed_commit", "during_iteration_training", "while_checkpointing"])
def test_resume_after_sigkill_matches_uninterrupted(tiny_bert_dir, evolve_reference, tmp_path, kill_point):
    overrides, ref = [f"--{o}" for o in tiny_overrides(tiny_bert_dir)], evolve_reference
    run = tmp_path / "run"
    proc = _ser(["evolve", "--out", str(run), *overrides], nice=True)

    def committed(n):
        s = run / "state.json"
        return s.exists() and json.loads(s.read_text())["completed"] >= n

    if kill_point == "after_seed_commit":
        _wait_for(lambda: committed(0), proc)
    elif kill_point == "during_iteration_training":
        _wait_for(lambda: (run / "metrics.jsonl").exists()
                  and '"iteration": 1, "step"' in (run / "metrics.jsonl").read_text(), proc)
    else:
        _wait_for(lambda: any(run.glob("iterations/.1.*.tmp")), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    p = _ser(["evolve", "--resume", str(run)])
    out = p.communicate()[0]
    assert p.returncode == 0, out
    assert iteration_records(run) == iteration_records(ref)
    for it in range(len(iteration_records(ref))):
        wa = load_file(ref / "iterations" / str(it) / "model.safetensors")
        wb = load_file(run / "iterations" / str(it) / "model.safetensors")
        assert all((wa[k] == wb[k]).all() for k in wa)


TRAIN_RM_KILL_POINTS = {
    # a checkpoint at step 3 exists and training is past it
    "during_training": lambda run: '"step": 5,' in _text(run / "metrics.jsonl"),
    "while_checkpointing": lambda run: any(run.glob(".checkpoint.*.tmp")),
    # all 16 steps done: the final evaluation and the saved RM's reward statistics are being computed
    "during_final_scoring": lambda run: '"step": 16,' in _text(run / "metrics.jsonl"),
}


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


TRAIN_RM_OVERRIDES = ["--model.max_length=64", "--data.train=hh-rlhf:helpful-base", "--data.seed_size=64",
                      "--data.test_size=200", "--train.batch_size=8", "--train.epochs=2", "--train.lr=1e-3",
                      "--train.save_every=3", "--train.eval_every=8"]


@pytest.fixture(scope="module")
def train_rm_reference(tiny_bert_dir, tmp_path_factory):
    ref = tmp_path_factory.mktemp("train-rm") / "ref"
    p = _ser(["train-rm", "--out", str(ref), f"--model.backbone={tiny_bert_dir}", *TRAIN_RM_OVERRIDES])
    assert p.wait() == 0, p.stdout.read()
    return ref


@pytest.mark.parametrize("kill_point", TRAIN_RM_KILL_POINTS)
def test_train_rm_resume_after_sigkill_matches_uninterrupted(tiny_bert_dir, shared_data, train_rm_reference,
                                                             tmp_path, kill_point):
    """Mid-training checkpoints (weights, optimizer, schedule, RNG): the resumed run is the uninterrupted one,
    dropout included, bit for bit."""
    overrides, ref = [f"--model.backbone={tiny_bert_dir}", *TRAIN_RM_OVERRIDES], train_rm_reference
    run = tmp_path / "run"
    proc = _ser(["train-rm", "--out", str(run), *overrides], nice=True)
    _wait_for(lambda: TRAIN_RM_KILL_POINTS[kill_point](run), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "result.json").exists()
    p = _ser(["train-rm", "--resume", str(run)])
    out = p.communicate()[0]
    assert p.returncode == 0, out
    if kill_point != "while_checkpointing":  # (the first checkpoint may be the one that was being written)
        assert "resumed from" in out
    drop_time = lambda r: {k: v for k, v in r.items() if "seconds" not in k}  # noqa: E731
    assert [drop_time(r) for r in records(run)] == [drop_time(r) for r in records(ref)]
    assert drop_time(json.loads((run / "result.json").read_text())) == \
        drop_time(json.loads((ref / "result.json").read_text()))
    wa, wb = (load_file(r / "rm" / "model.safetensors") for r in (ref, run))
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert not (run / "checkpoint").exists()  # removed once the run is complete


def test_experiment_report(tiny_bert_dir, shared_data, tmp_path):
    from ser.experiment import run_experiment

    methods = ("[seed_only, full_label, seed_continued, ser_paper, ser_code, ssrm, ser_ensemble, "
               "ser_ensemble_threshold]")
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, **{"experiment.seeds": "[0, 1]", "ser.max_iterations": 1,
                                                             "experiment.bootstrap": 200, "experiment.methods": methods}))
    root = run_experiment(cfg, str(tmp_path / "exp"))
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["methods"]) == {"seed_only", "full_label", "seed_continued", "ser_paper", "ser_code", "ssrm",
                                       "ser_ensemble", "ser_ensemble_threshold"}
    # the second ensemble method shares the first one's iteration 0 (seed RM, votes, and the fold models that its
    # continuing fold models start from): hard links
    for f in ("votes/0.npz", "folds/0/1/model.safetensors"):
        first, second = (root / "seed0" / m / f for m in ("ser_ensemble", "ser_ensemble_threshold"))
        assert first.stat().st_ino == second.stat().st_ino
    # the control: the seed RM continued once (ser.max_iterations) on the human seed alone, its accuracy reported
    for i, seed in enumerate(("seed0", "seed1")):
        control = json.loads((root / seed / "seed_continued.json").read_text())
        assert [r["iteration"] for r in control["iterations"]] == [1]
        assert control["iterations"][0]["accuracy"] == np.mean(control["correct"])
        assert summary["methods"]["seed_continued"]["per_seed"][i] == np.mean(control["correct"])
        assert (root / seed / "seed_continued" / "1" / "config.json").exists()
        assert control["by_iteration"]["1"] == control["correct"] and set(control["by_iteration"]) == {"0", "1"}
    # each method is paired with the control after as many iterations as the RM it returned (0: the seed RM)
    from ser.evolve import final_iteration, load_state, run_config

    for m in ("ser_paper", "ssrm", "ser_ensemble", "ser_ensemble_threshold"):
        expected = []
        for i, seed in enumerate(("seed0", "seed1")):
            run = root / seed / m
            returned = final_iteration(run_config(run), load_state(run))
            control = json.loads((root / seed / "seed_continued.json").read_text())["by_iteration"][str(returned)]
            expected.append(summary["methods"][m]["per_seed"][i] - np.mean(control))
        assert summary["methods"][m]["vs_seed_continued"]["diff"] == pytest.approx(np.mean(expected), abs=1e-12)
    for m in summary["methods"].values():
        lo, hi = m["ci95"]
        assert lo <= m["accuracy"] <= hi and len(m["per_seed"]) == 2
    # the self-labelling runs share the seed RM (hard links), so their iteration-0 accuracy is the seed-only one
    for seed in ("seed0", "seed1"):
        it0 = {m: [r["rm/acc"] for r in map(json.loads, (root / seed / m / "metrics.jsonl").read_text().splitlines())
                   if "rm/acc" in r and r.get("iteration") == 0] for m in ("seed_only", "ser_paper")}
        assert len(it0["ser_paper"]) == 1 and it0["ser_paper"] == it0["seed_only"]
        weights = [root / seed / m / "iterations" / "0" / "model.safetensors" for m in ("seed_only", "ser_paper")]
        assert weights[0].stat().st_ino == weights[1].stat().st_ino
    md = (root / "report.md").read_text()
    assert "| seed_only |" in md and "gap closed" in md and "pseudo-label precision" in md.lower()
    assert "| 0 | ser_ensemble | 0 | " in md and "val acc" in md  # the ensemble's seed RM has an out-of-fold val acc
    html = (root / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5

def test_learning_curve(tiny_bert_dir, shared_data, tmp_path):
    from ser.errors import UserError
    from ser.experiment import run_curve

    cfg = load_config(None, tiny_overrides(tiny_bert_dir, **{"experiment.seeds": "[0, 1]", "experiment.bootstrap": 200,
                                                             "train.epochs": 1}))
    root = run_curve(cfg, str(tmp_path / "curve"), ["8", "0.005", "all"])
    points = json.loads((root / "curve.json").read_text())["points"]
    # 0.005 of the 2,348 usable helpful-base pairs (what data.seed_size takes fractions of) = 11.74: 12 labels;
    # 'all' = seed + pool = 96
    assert [p["labels"] for p in points] == [8, 12, 96]
    for p in points:
        assert p["ci95"][0] <= p["accuracy"] <= p["ci95"][1] and len(p["per_seed"]) == 2
    assert "| 96 |" in (root / "curve.md").read_text() and (root / "curve.png").stat().st_size > 0
    # finished points are reused: a second call trains nothing and gives the same numbers
    stamp = (root / "seed0" / "n8.json").stat().st_mtime_ns
    assert json.loads((run_curve(cfg, str(root), ["8", "0.005", "all"]) / "curve.json").read_text())["points"] == points
    assert (root / "seed0" / "n8.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="labelled training pairs"):
        run_curve(cfg, str(tmp_path / "c2"), ["97"])
    with pytest.raises(UserError, match="--sizes"):
        run_curve(cfg, str(tmp_path / "c3"), ["ten"])
    with pytest.raises(UserError, match="other settings"):
        run_curve(load_config(None, tiny_overrides(tiny_bert_dir, **{"train.lr": 1e-4, "train.epochs": 1})),
                  str(root), ["8"])


def test_a_killed_curve_point_resumes_inside_its_training(tiny_bert_dir, shared_data, tmp_path, monkeypatch,
                                                          caplog):
    """A point in training keeps a resumable state every train.save_every steps: killed after its second
    checkpoint, the curve continues from it, ends with the uninterrupted point's test results, adds up the
    segments' wall time and leaves no checkpoint behind; resuming with other settings is refused."""
    from ser import train
    from ser.errors import UserError
    from ser.experiment import run_curve

    cfg = load_config(None, tiny_overrides(tiny_bert_dir, **{"experiment.seeds": "[0]", "experiment.bootstrap": 50,
                                                             "train.epochs": 1, "train.save_every": 2}))
    reference = json.loads((run_curve(cfg, str(tmp_path / "ref"), ["64"]) / "seed0" / "n64.json").read_text())
    saved, save = [], train.save_train_state

    def killed_after_the_second_checkpoint(*args, **kwargs):
        save(*args, **kwargs)
        saved.append(args[5])  # the step
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_train_state", killed_after_the_second_checkpoint)
    root = tmp_path / "curve"
    with pytest.raises(KeyboardInterrupt):
        run_curve(cfg, str(root), ["64"])
    assert saved == [2, 4] and (root / "seed0" / "n64.checkpoint").is_dir()
    assert not (root / "seed0" / "n64.json").exists()
    with pytest.raises(UserError, match="n64.started.json was trained with other settings"):
        run_curve(load_config(None, tiny_overrides(tiny_bert_dir, **{"experiment.seeds": "[0]", "train.lr": 1e-4,
                                                                     "train.epochs": 1})), str(root), ["64"])
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="ser"):
        run_curve(cfg, str(root), ["64"])
    assert "resumed from" in caplog.text and "at step 4 of 8" in caplog.text
    point = json.loads((root / "seed0" / "n64.json").read_text())
    assert point["correct"] == reference["correct"] and point["accuracy"] == reference["accuracy"]
    assert point["seconds"] > 0 and sorted(p.name for p in (root / "seed0").iterdir()) == ["data_hash", "n64.json"]


def test_learning_curve_compares_modes_side_by_side(tiny_bert_dir, shared_data, tmp_path):
    from ser.errors import UserError
    from ser.experiment import run_curve

    cfg = load_config(None, tiny_overrides(tiny_bert_dir, **{"experiment.seeds": "[0]", "experiment.bootstrap": 50,
                                                             "train.epochs": 1}))
    root = run_curve(cfg, str(tmp_path / "curve"), ["8", "all"], ["full", "freeze:1"])
    summary = json.loads((root / "curve.json").read_text())
    assert list(summary["modes"]) == ["full", "freeze:1"]
    for mode in ("full", "freeze:1"):
        assert [p["labels"] for p in summary["modes"][mode]] == [8, 96]
        assert all(p["seconds"] > 0 for p in summary["modes"][mode])
        assert (root / mode / "seed0" / "n96.json").exists()  # each mode's points kept apart, resumable
    assert summary["points"] == summary["modes"]["full"]
    assert set(summary["choice"]) == {"8", "96"} and set(summary["choice"].values()) <= {"full", "freeze:1"}
    md = (root / "curve.md").read_text()
    assert "| human labels | full | freeze:1 | fastest within 1 point of full |" in md and "| 96 | " in md
    with pytest.raises(UserError, match="--modes"):
        run_curve(cfg, str(tmp_path / "c2"), ["8"], ["freeze"])


def test_fastest_within_picks_the_quickest_mode_within_the_tolerance():
    from ser.experiment import fastest_within

    curves = {"full": [{"labels": 10, "accuracy": 0.60, "seconds": 100.0},
                       {"labels": 50, "accuracy": 0.70, "seconds": 400.0}],
              "lora": [{"labels": 10, "accuracy": 0.595, "seconds": 80.0},
                       {"labels": 50, "accuracy": 0.69, "seconds": 300.0}],  # 0.69 = 0.70 - 0.01: within
              "freeze:1": [{"labels": 10, "accuracy": 0.589, "seconds": 10.0},  # 1.1 points below: out
                           {"labels": 50, "accuracy": 0.75, "seconds": 30.0}]}
    assert fastest_within(curves, "full", 0.01) == {10: "lora", 50: "freeze:1"}
    assert fastest_within(curves, "full", 0.0) == {10: "full", 50: "freeze:1"}
    assert fastest_within({"lora": curves["lora"]}, "full", 0.01) == {}


def test_a_run_from_before_val_metric_resumes_choosing_on_its_accuracy(tmp_path):
    import yaml

    from ser.config import Config, to_dict
    from ser.errors import UserError
    from ser.evolve import final_iteration, load_state, run_config

    assert load_state(tmp_path) == State()  # no state.json yet: a fresh run
    with pytest.raises(UserError, match="not a run directory"):
        run_config(tmp_path)
    old = to_dict(Config())
    del old["ser"]["val_metric"]  # written before the option existed: accuracy chose
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert Config().ser.val_metric == "log_likelihood" and run_config(tmp_path).ser.val_metric == "accuracy"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(Config())))
    assert run_config(tmp_path).ser.val_metric == "log_likelihood"
    (tmp_path / "state.json").write_text(json.dumps({"completed": 2, "val_acc": [0.60, 0.64, 0.62]}))
    state = load_state(tmp_path)
    assert state.val_score == [0.60, 0.64, 0.62]  # accuracy chose those iterations
    assert final_iteration(Config(), state) == 1  # 0.64: the best
    (tmp_path / "state.json").write_text(json.dumps({"completed": 1, "val_acc": [0.6, 0.7], "val_score": [-0.6, -0.7]}))
    assert load_state(tmp_path).val_score == [-0.6, -0.7]  # recorded scores stand


def test_experiment_and_curve_refuse_several_processes(tiny_bert_dir, monkeypatch, tmp_path):
    """They write their runs' files from one process: under torchrun (WORLD_SIZE=2) an error, nothing written."""
    from ser.errors import UserError
    from ser.experiment import run_curve, run_experiment

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, tiny_overrides(tiny_bert_dir))
    with pytest.raises(UserError, match="ser curve runs on one process"):
        run_curve(cfg, str(tmp_path / "curve"), ["8"])
    with pytest.raises(UserError, match="ser experiment runs on one process"):
        run_experiment(cfg, str(tmp_path / "exp"))
    assert not list(tmp_path.iterdir())


def test_validation_picks_final_and_test_labels_change_no_decision(tiny_bert_dir, shared_data, tmp_path):
    """ser.validation: 8 of the 32 seed pairs are held out of training; they calibrate, choose `final` (the best
    validation accuracy, ties to the earlier iteration) and stop the loop. Flipping every test label changes the
    test accuracies only: the same pseudo-labels, validation numbers, choice and weights (the firewall). The default
    ser.val_metric, the calibrated log-likelihood of the validation margins, chooses."""
    from ser.crossfit import choose_iteration
    from ser.pipeline import load_splits

    lines = gzip.open(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", "rt").read().splitlines()[:300]
    original = tmp_path / "orig.jsonl"
    original.write_text("\n".join(lines) + "\n")
    extra = {"ser.validation": 8, "ser.patience": 1, "ser.max_iterations": 3}
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, original, **extra))
    test_ids = {p.id for p in load_splits(cfg.data).test}
    cfg_f = load_config(None, tiny_overrides(tiny_bert_dir, flipped_copy(lines, test_ids, tmp_path), **extra))
    assert {p.id for p in load_splits(cfg_f.data).test} == test_ids
    a, b = run_evolve(cfg, str(tmp_path / "a")), run_evolve(cfg_f, str(tmp_path / "b"))
    ra, rb = iteration_records(a), iteration_records(b)
    assert ra[0]["val/n"] == 8 and ra[0]["train/pairs"] == 24  # held out of the seed RM's training
    val = [r["val/log_lik"] for r in ra]
    chosen, stop = choose_iteration(val, 1)
    assert [r["ser/chosen"] for r in ra] == [choose_iteration(val[: i + 1], 1)[0] for i in range(len(ra))]
    end = [r for r in records(a) if "ser/stop_reason" in r][-1]
    assert end["ser/final"] == chosen
    # no improvement in the last iteration (patience 1): the loop stops and says so; else it ran out of iterations
    assert ("validation log-likelihood did not improve" in end["ser/stop_reason"]) == stop
    fa, fc = load_file(a / "final" / "model.safetensors"), load_file(a / "iterations" / str(chosen) / "model.safetensors")
    assert all((fa[k] == fc[k]).all() for k in fa)
    # the firewall: test labels decide nothing
    for r1, r2 in zip(ra, rb):
        assert r1["rm/acc"] == pytest.approx(1 - r2["rm/acc"])
        for key in ("val/acc", "val/log_lik", "ser/chosen", "ser/added", "ser/offset", "ser/temperature"):
            assert r1.get(key) == r2.get(key), key
    assert json.loads((a / "state.json").read_text())["pseudo"] == json.loads((b / "state.json").read_text())["pseudo"]
    for it in range(len(ra)):
        wa = load_file(a / "iterations" / str(it) / "model.safetensors")
        wb = load_file(b / "iterations" / str(it) / "model.safetensors")
        assert all((wa[k] == wb[k]).all() for k in wa)


def test_a_one_rm_rule_with_folds_validates_the_whole_procedure_out_of_fold(tiny_bert_dir, shared_data, tmp_path):
    """ser.folds with a one-RM rule (ssrm): fold model j self-labels the pool for its own training (`label_folds`),
    so nothing it learns comes from fold j's labels. Flipping every label of fold 0's seed pairs changes the RM and
    its pseudo-labels, but not fold model 0: its pseudo-labels are the same and its out-of-fold margins on fold 0
    are exactly negated (the same model, chosen and rejected swapped). Trained on the RM's pseudo-labels, fold
    model 0 would change with them."""
    from ser.crossfit import fold_assignment
    from ser.data import hide_labels
    from ser.pipeline import load_splits

    lines = gzip.open(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", "rt").read().splitlines()[:300]
    original = tmp_path / "orig.jsonl"
    original.write_text("\n".join(lines) + "\n")
    extra = {"ser.rule": "ssrm", "ser.folds": 2, "ser.ssrm_threshold": 0.5, "ser.max_iterations": 1,
             "ser.calibration": "temperature", "train.epochs": 1}
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, original, **extra))
    seed = load_splits(cfg.data).seed
    folds = fold_assignment([p.id for p in seed], 2, cfg.data.split_seed)
    fold0 = {p.id for p, f in zip(seed, folds) if f == 0}
    flipped = flipped_copy(lines, fold0, tmp_path)
    a = run_evolve(cfg, str(tmp_path / "a"))
    b = run_evolve(load_config(None, tiny_overrides(tiny_bert_dir, flipped, **extra)), str(tmp_path / "b"))
    sa, sb = (json.loads((r / "state.json").read_text()) for r in (a, b))
    assert len(sa["fold_pseudo"]) == 2 and sa["fold_pseudo"][0] and sa["fold_pseudo"][0] == sb["fold_pseudo"][0]
    assert sa["pseudo"] != sb["pseudo"]  # the RM learnt the flipped labels: its pseudo-labels moved
    record = iteration_records(a)[1]
    assert record["ser/fold_added"] == [len(f) for f in sa["fold_pseudo"]]
    _, truth = hide_labels(load_splits(cfg.data).pool)  # 0: answer A is the human-chosen one
    right = [np.mean([truth[i] == (0 if a_chosen else 1) for i, a_chosen, _ in f]) for f in sa["fold_pseudo"]]
    assert record["ser/fold_precision"] == pytest.approx(right)
    assert record["val/source"] == "out-of-fold"
    za, zb = (np.load(r / "votes" / "1.npz") for r in (a, b))
    in0 = folds == 0
    assert np.array_equal(za["folds"], folds) and in0.any()
    np.testing.assert_array_equal(za["oof"][in0], -zb["oof"][in0])
    assert not np.allclose(za["oof"][~in0], -zb["oof"][~in0])  # fold 1's model trained on the flipped pairs
    assert np.isnan(np.load(a / "votes" / "0.npz")["margins"]).all()  # a one-RM rule's fold models cast no votes


def test_ensemble_loop_cross_fits_the_seed_out_of_fold(tiny_bert_dir, shared_data, tmp_path, monkeypatch):
    """rule=ensemble: every seed pair's validation margin comes from a fold model that did not train on it (by the
    pairs each model was given); the fold models' votes label the pool; validation is out of fold, and with
    ser.val_metric = log_likelihood the out-of-fold margins' calibrated log-likelihood chooses."""
    from ser.crossfit import calibrated_log_likelihood

    import ser.evolve as evolve

    trained_on, scored, schedules = {}, [], []
    real_fit, real_scores = evolve.fit_rm, evolve.rm_scores

    def fit(cfg, prompts, chosen, rejected, **kw):
        schedules.append((kw.get("init"), kw.get("epochs")))
        rm, tok, summary = real_fit(cfg, prompts, chosen, rejected, **kw)
        trained_on[id(rm)] = set(zip(prompts, chosen, rejected))
        return rm, tok, summary

    def scores(rm, tok, pairs, cfg, accelerator=None):
        scored.append([p.id for p in pairs])
        assert not trained_on[id(rm)] & {(p.prompt, p.chosen, p.rejected) for p in pairs}  # never its own pairs
        return real_scores(rm, tok, pairs, cfg, accelerator)

    monkeypatch.setattr(evolve, "fit_rm", fit)
    monkeypatch.setattr(evolve, "rm_scores", scores)
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, **{"ser.rule": "ensemble", "ser.folds": 3,
                                                             "ser.confidence": 0.5, "ser.restart": True,
                                                             "ser.patience": 2, "ser.soft_labels": True,
                                                             "ser.val_metric": "log_likelihood",
                                                             "ser.max_iterations": 1}))
    run = run_evolve(cfg, str(tmp_path / "run"))
    rows = iteration_records(run)
    z = np.load(run / "votes" / "0.npz")
    assert sorted(sum(scored[:3], [])) == sorted(z["seed_ids"].tolist())  # iteration 0: each seed pair once
    assert z["margins"].shape == (3, 64) and np.isfinite(z["oof"]).all() and float(z["temperature"]) > 0
    assert rows[0]["val/source"] == "out-of-fold" and rows[0]["val/n"] == 32
    assert rows[0]["val/acc"] == float(np.mean(z["oof"] > 0))
    assert rows[0]["val/log_lik"] == calibrated_log_likelihood(z["oof"])
    assert len(rows) == 2 and rows[1]["ser/status"] == "vote" and rows[1]["ser/added"] > 0
    assert "audit/precision_by_decile" in rows[1] and "ser/pseudo_precision" in rows[1]
    assert any(k.startswith("ser/pseudo_precision_agree") for k in rows[1])
    assert sum(n for n, _ in rows[1]["audit/precision_by_agree"].values()) == rows[1]["ser/candidates"] == 64
    pseudo = json.loads((run / "state.json").read_text())["pseudo"]
    assert all(0.5 <= q <= 1 for _, _, q in pseudo)  # soft targets: P of the labelled direction
    # the label-free precision estimate is the mean calibrated P of iteration 1's pseudo-labels (stored in order)
    assert rows[1]["ser/expected_precision"] == pytest.approx(np.mean([q for _, _, q in pseudo[:rows[1]["ser/added"]]]))
    end = records(run)[-1]
    assert end["ser/final"] == choose_iteration([r["val/log_lik"] for r in rows], 2)[0]
    assert json.loads((run / "state.json").read_text())["val_score"] == [r["val/log_lik"] for r in rows]
    # ser.restart: every RM and fold model of every iteration trains from the backbone for train.epochs (None),
    # the seed RM's recipe; `ser evolve` trained restarted iterations for ser.iteration_epochs (1 of 2 here)
    assert schedules == [(None, None)] * 8  # (seed RM + 3 fold models) x (iterations 0 and 1)


def test_fold_models_continue_from_their_own_previous_iteration_without_restart(tiny_bert_dir, shared_data, tmp_path,
                                                                                monkeypatch):
    """ser.restart=false: the returned RM continues from the previous iteration's, and so does each fold model
    (the out-of-fold accuracy must validate the recipe that made the returned RM); superseded fold models are
    deleted, iteration 0's are kept (experiments share them)."""
    import ser.evolve as evolve

    inits, real_fit = [], evolve.fit_rm

    def fit(cfg, prompts, chosen, rejected, **kw):
        inits.append((kw["desc"], kw.get("init")))
        return real_fit(cfg, prompts, chosen, rejected, **kw)

    monkeypatch.setattr(evolve, "fit_rm", fit)
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, **{"ser.rule": "ensemble", "ser.folds": 2,
                                                             "ser.confidence": 0.5, "ser.restart": False,
                                                             "ser.patience": 2}))
    run = run_evolve(cfg, str(tmp_path / "run"))
    assert len(iteration_records(run)) == 3
    assert inits == [("iteration 0", None), ("iteration 0 fold 1/2", None), ("iteration 0 fold 2/2", None),
                     ("iteration 1", str(run / "iterations" / "0")),
                     ("iteration 1 fold 1/2", str(run / "folds" / "0" / "0")),
                     ("iteration 1 fold 2/2", str(run / "folds" / "0" / "1")),
                     ("iteration 2", str(run / "iterations" / "1")),
                     ("iteration 2 fold 1/2", str(run / "folds" / "1" / "0")),
                     ("iteration 2 fold 2/2", str(run / "folds" / "1" / "1"))]
    assert sorted(os.listdir(run / "folds")) == ["0"] and sorted(os.listdir(run / "folds" / "0")) == ["0", "1"]
    assert (run / "folds" / "0" / "1" / "model.safetensors").exists()


def test_target_precision_stops_the_loop_when_no_set_of_votes_clears_it(tiny_bert_dir, shared_data, tmp_path):
    """ser.target_precision: the selected pairs are trimmed to the most confident ones whose expected precision
    clears it; a tiny random RM's votes are nowhere near 0.99 sure, so every pair the vote selected (recomputed
    from the stored votes) is trimmed, and the loop stops at iteration 1, saying why, and returns the seed RM."""
    from ser.crossfit import select_by_vote

    cfg = load_config(None, tiny_overrides(tiny_bert_dir, **{"ser.rule": "ensemble", "ser.folds": 2,
                                                             "ser.confidence": 0.5, "ser.target_precision": 0.99}))
    run = run_evolve(cfg, str(tmp_path / "run"))
    stop, z = records(run)[-2], np.load(run / "votes" / "0.npz")
    selected = int(select_by_vote(z["margins"], float(z["temperature"]), 0.5)["take"].sum())
    assert stop["iteration"] == 1 and stop["ser/added"] == 0 and stop["ser/precision_trimmed"] == selected > 0
    assert "ser.target_precision" in stop["ser/stop"] and records(run)[-1]["ser/final"] == 0


def test_seed_rm_epochs_are_chosen_on_out_of_fold_accuracy(tiny_bert_dir, shared_data, tmp_path, monkeypatch):
    """ser.seed_epochs: the seed RM and its fold models go on one epoch at a time while the out-of-fold accuracy
    improves (patience 1). On the hand-made validation sequence 0.50, 0.60, 0.55 (epochs 1, 2, 3) epoch 2 is
    chosen and epoch 4 never trains; iteration 0 is epoch 2's RM, `folds/0` epoch 2's fold models (their
    out-of-fold margins are the votes file's), and iteration 1 continues from both."""
    import torch

    import ser.evolve as evolve
    from ser.pipeline import load_splits, rm_scores

    calls, weights, real_fit = [], {}, evolve.fit_rm

    def fit(cfg, prompts, chosen, rejected, **kw):
        calls.append((kw["desc"], kw.get("init"), kw.get("epochs")))
        rm, tok, summary = real_fit(cfg, prompts, chosen, rejected, **kw)
        weights[kw["desc"]] = {k: v.detach().clone() for k, v in rm.state_dict().items()}
        return rm, tok, summary

    sequence, real_validation = [0.50, 0.60, 0.55], evolve.oof_validation

    def validation(oof, cfg):  # the seed RM's epochs see the hand-made sequence, later iterations the real one
        out = real_validation(oof, cfg)
        return {**out, "val/acc": sequence.pop(0)} if sequence else out

    monkeypatch.setattr(evolve, "fit_rm", fit)
    monkeypatch.setattr(evolve, "oof_validation", validation)
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, **{
        "ser.rule": "ensemble", "ser.folds": 2, "ser.confidence": 0.5, "ser.max_iterations": 1, "train.epochs": 1,
        "ser.seed_epochs": 4, "ser.val_metric": "accuracy"}))
    run = run_evolve(cfg, str(tmp_path / "run"))
    stage = run / "seed_epochs"
    assert calls[:9] == [("seed RM, epoch 1", None, None), ("iteration 0 fold 1/2", None, None),
                         ("iteration 0 fold 2/2", None, None),
                         ("seed RM, epoch 2", str(stage / "1" / "rm"), 1.0),
                         ("iteration 0 fold 1/2", str(stage / "1" / "folds" / "0"), 1.0),
                         ("iteration 0 fold 2/2", str(stage / "1" / "folds" / "1"), 1.0),
                         ("seed RM, epoch 3", str(stage / "2" / "rm"), 1.0),
                         ("iteration 0 fold 1/2", str(stage / "2" / "folds" / "0"), 1.0),
                         ("iteration 0 fold 2/2", str(stage / "2" / "folds" / "1"), 1.0)]
    assert calls[9] == ("iteration 1", str(run / "iterations" / "0"), 1.0)
    assert calls[10][1] == str(run / "folds" / "0" / "0")
    seed_record = iteration_records(run)[0]
    assert seed_record["ser/seed_epochs"] == 2 and seed_record["val/by_seed_epoch"] == {"1": 0.5, "2": 0.6, "3": 0.55}
    saved = load_file(run / "iterations" / "0" / "model.safetensors")
    assert all(torch.equal(saved[k], weights["seed RM, epoch 2"][k]) for k in saved)
    # folds/0 are epoch 2's fold models: re-scoring the seed pairs of their own fold gives the votes' oof margins
    z = np.load(run / "votes" / "0.npz")
    split = load_splits(cfg.data)
    for j in range(2):
        rm, tok = evolve.load_rm(run / "folds" / "0" / str(j), cfg)
        held = [p for p, f in zip(split.seed, z["folds"]) if f == j]
        r_c, r_r = rm_scores(rm, tok, held, cfg)
        assert np.allclose(r_c - r_r, z["oof"][z["folds"] == j], atol=1e-5)
    assert z["margins"].shape == (2, len(split.pool)) and not stage.exists()


def test_seed_rm_epochs_on_a_hold_out_and_shared_by_an_experiment(tiny_bert_dir, shared_data, tmp_path):
    """Without folds the held-out seed pairs (ser.validation) choose the seed RM's epochs; `ser experiment` with
    experiment.seed_epochs chooses them once per seed by cross-fitting (seed_only's run) and every method starts
    from that seed RM: the ensemble also from its votes and fold models (hard links)."""
    from ser.crossfit import calibrated_log_likelihood
    from ser.experiment import run_experiment

    cfg = load_config(None, tiny_overrides(tiny_bert_dir, **{"ser.validation": 8, "ser.max_iterations": 0,
                                                             "train.epochs": 1, "ser.seed_epochs": 3}))
    record = iteration_records(run_evolve(cfg, str(tmp_path / "holdout")))[0]
    assert 1 <= record["ser/seed_epochs"] <= 3 and list(record["val/by_seed_epoch"])[0] == "1"
    assert record["val/acc"] == record["val/by_seed_epoch"][f"{record['ser/seed_epochs']:g}"]
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, **{
        "experiment.seeds": "[0]", "ser.max_iterations": 1, "experiment.bootstrap": 50, "train.epochs": 1,
        "experiment.seed_epochs": 2, "experiment.methods": "[seed_only, ser_paper, ser_ensemble, ssrm_validated]",
        "ser.ssrm_threshold": 0.5}))  # ssrm_validated takes every pool pair: an iteration to validate
    root = run_experiment(cfg, str(tmp_path / "exp"))
    seed_run = root / "seed0" / "seed_only"
    record = iteration_records(seed_run)[0]
    assert set(record["val/by_seed_epoch"]) <= {"1", "2"} and record["val/source"] == "out-of-fold"
    for m in ("ser_ensemble", "ssrm_validated"):
        for f in ("iterations/0/model.safetensors", "votes/0.npz", "folds/0/3/model.safetensors"):
            assert (seed_run / f).stat().st_ino == (root / "seed0" / m / f).stat().st_ino
    # ssrm_validated: SSRM's selection, the fold models' out-of-fold validation choosing what it returns
    run = root / "seed0" / "ssrm_validated"
    records = iteration_records(run)
    state = json.loads((run / "state.json").read_text())
    assert [r.get("ser/status") for r in records] == [None, "ssrm"] and len(state["val_score"]) == 2
    assert len(state["fold_pseudo"]) == 4 and records[1]["ser/fold_added"] == [len(f) for f in state["fold_pseudo"]]
    assert all(r["val/source"] == "out-of-fold" for r in records[1:]) and state["val_score"][0] == record["val/log_lik"]
    assert records[-1]["ser/chosen"] == choose_iteration(state["val_score"], 1)[0]
    assert (seed_run / "iterations/0/model.safetensors").stat().st_ino == \
        (root / "seed0" / "ser_paper" / "iterations/0/model.safetensors").stat().st_ino
    # the paper's rule does not validate: it returns its last iteration, whatever the shared seed RM's val acc was
    assert json.loads((root / "seed0" / "ser_paper" / "state.json").read_text())["val_acc"] == []
    # the ensemble's metric (log-likelihood) chose the seed RM's epochs, and the fork starts from its value
    by_epoch = list(record["val/log_lik_by_seed_epoch"].values())
    assert record["ser/seed_epochs"] == 1 + choose_iteration(by_epoch, 1)[0]
    oof = np.load(seed_run / "votes" / "0.npz")["oof"]
    assert json.loads((root / "seed0" / "ser_ensemble" / "state.json").read_text())["val_score"][0] == \
        calibrated_log_likelihood(oof) == record["val/log_lik"]
    assert "Seed RM epochs, chosen on out-of-fold log-likelihood" in (root / "report.md").read_text()


class _OneProcess:  # the two accelerate calls save_state makes, on one process
    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_a_fork_starts_from_the_seed_rm_validation_of_its_own_source(tmp_path):
    """With ser.validation > 0 the shared seed RM was validated on the hold-out, as every later iteration of the
    fork will be: the fork's iteration-0 score is that hold-out value in the fork's metric, not the out-of-fold
    margins of the fold models (weaker RMs, a different number) that its votes also keep."""
    import dataclasses

    from ser.config import Config
    from ser.crossfit import calibrated_log_likelihood
    from ser.evolve import load_state, save_state
    from ser.experiment import _fork_from_seed_rm, method_config

    cfg = Config()
    cfg = method_config(dataclasses.replace(cfg, ser=dataclasses.replace(cfg.ser, validation=50)), "ser_ensemble_soft")
    src = tmp_path / "ser_ensemble"
    for d in ("iterations/0", "folds/0", "votes"):
        (src / d).mkdir(parents=True)
    oof = np.array([1.0, -0.5, 2.0, 0.3])
    np.savez(src / "votes" / "0.npz", oof=oof)
    for d in ("iterations/0", "folds/0"):
        (src / d / "model.safetensors").write_bytes(b"weights")
    held_out = {"iteration": 0, "val/acc": 0.7, "val/log_lik": -0.55, "rm/acc": 0.6}
    (src / "metrics.jsonl").write_text(json.dumps(held_out) + "\n")
    save_state(src, State(completed=0, val_acc=[0.7], val_score=[-0.55]), _OneProcess())
    _fork_from_seed_rm(src, tmp_path / "fork", cfg, _OneProcess())
    state = load_state(tmp_path / "fork")
    assert state.val_acc == [0.7] and state.val_score == [-0.55] != [calibrated_log_likelihood(oof)]
    # a fork killed before its config.yaml is forked again from scratch (its hard links used to collide)
    (tmp_path / "fork" / "config.yaml").unlink()
    (tmp_path / "fork" / "votes" / "stray.npz").write_bytes(b"half")
    _fork_from_seed_rm(src, tmp_path / "fork", cfg, _OneProcess())
    assert sorted(p.name for p in (tmp_path / "fork" / "votes").iterdir()) == ["0.npz"]
    assert (tmp_path / "fork" / "folds" / "0" / "model.safetensors").stat().st_ino == \
        (src / "folds" / "0" / "model.safetensors").stat().st_ino
    acc_cfg = dataclasses.replace(cfg, ser=dataclasses.replace(cfg.ser, val_metric="accuracy"))
    _fork_from_seed_rm(src, tmp_path / "fork_acc", acc_cfg, _OneProcess())
    assert load_state(tmp_path / "fork_acc").val_score == [0.7]


def test_a_seed_results_are_reused_only_on_the_same_pairs_and_labels(tmp_path):
    """settings.json fixes the data spec, not the file's contents: a file regenerated at the same path (other pairs,
    or the same pairs with a label flipped) must not pair a seed's old results with new test pairs."""
    from ser.data import Pair, Split, pair_id
    from ser.errors import UserError
    from ser.experiment import check_same_data

    def pair(prompt, chosen, rejected):
        return Pair(pair_id(prompt, chosen, rejected), prompt, chosen, rejected, "t")

    seed, pool, test = [pair("p1", "a", "b")], [pair("p2", "c", "d")], [pair("p3", "e", "f")]
    check_same_data(tmp_path, Split(seed, pool, test))
    check_same_data(tmp_path, Split(seed, pool, test))  # the same data: reused
    flipped = [pair("p3", "f", "e")]  # the same id, the other answer chosen
    assert flipped[0].id == test[0].id
    for other in (Split(seed, pool, flipped), Split(seed, [pair("p2", "c", "x")], test), Split(pool, seed, test)):
        with pytest.raises(UserError, match="made of other data"):
            check_same_data(tmp_path, other)
    # a run made before labels entered the hash still resumes on its data (it cannot tell a flipped label)
    from ser.pipeline import data_hash, same_data

    split = Split(seed, pool, test)
    assert data_hash(split) != data_hash(Split(seed, pool, flipped))
    assert same_data(data_hash(split, labels=False), split) and same_data(data_hash(split), split)
    assert not same_data(data_hash(split), Split(seed, pool, flipped))


def test_audit_hand_example():
    from ser.evolve import audit

    take, a_wins = np.array([True, False, True, False]), np.array([True, True, False, False])
    truth, agree = np.array([True, False, True, False]), np.array([2, 1, 2, 2])
    out = audit(take, a_wins, agree, "agree", np.array([0.9, 0.6, 0.8, 0.55]), truth)
    # accepted: pair 0 right, pair 2 wrong -> 0.5, one flipped, both at agreement 2
    assert out["ser/pseudo_precision"] == 0.5 and out["ser/flipped"] == 1 and out["ser/pseudo_precision_agree2"] == 0.5
    # every candidate: agreement 1 = pair 1 (wrong); agreement 2 = pairs 0, 2, 3 (right, wrong, right)
    assert out["audit/precision_by_agree"] == {"1": [1, 0.0], "2": [3, pytest.approx(2 / 3)]}
    assert sum(n for _, n, _ in out["audit/precision_by_decile"]) == 4
    assert audit(take, a_wins, agree, "agree", np.ones(4), None) == {}
    assert "ser/pseudo_precision" not in audit(np.zeros(4, bool), a_wins, agree, "agree", np.ones(4), truth)


def test_a_non_finite_validation_margin_counts_as_a_tie_not_a_win():
    """An overflowed (inf) or NaN reward on a validation pair is scored as margin 0: wrong for accuracy (not right,
    as `inf > x` would say), chance's log 2 for the log-likelihood (not a crash)."""
    from ser.config import Config
    from ser.crossfit import calibrated_log_likelihood
    from ser.evolve import oof_validation

    record = oof_validation(np.array([np.inf, 0.5, -0.2, np.nan]), Config())
    assert record["val/acc"] == 0.25 and record["val/non_finite"] == 2 and record["val/n"] == 4
    assert record["val/log_lik"] == calibrated_log_likelihood([0.0, 0.5, -0.2, 0.0])


def test_calibration_leaves_a_non_finite_reward_out(monkeypatch):
    """One inf reward on the calibration pairs would make the offset inf and the fitted temperature the grid's
    sharpest (every pool pair 'certain'): it is left out of the offset and its margin counts as 0."""
    from ser import evolve
    from ser.config import Config
    from ser.selection import fit_temperature

    r_c, r_r = np.array([0.2, 0.3, np.inf, 0.1]), np.array([0.0, 0.4, 0.0, -0.2])
    monkeypatch.setattr(evolve, "rm_scores", lambda *a, **k: (r_c, r_r))
    cfg = Config()
    cfg.ser.calibration = "temperature"
    offset, temperature = evolve.calibrate(None, None, [], cfg)
    assert offset == pytest.approx(0.8 / 7) and temperature == fit_temperature([0.2, -0.1, 0.0, 0.3])
    with pytest.raises(ValueError, match="1 of 4 margins are not finite"):
        fit_temperature([0.2, -0.1, np.inf, 0.3])


def test_a_validation_fraction_that_rounds_to_no_pair_is_a_config_error():
    from ser.config import Config
    from ser.data import Split
    from ser.errors import UserError
    from ser.evolve import validation_split

    cfg = Config()
    cfg.ser.validation = 0.004
    split = Split(seed=[object()] * 100, pool=[], test=[])
    with pytest.raises(UserError, match="'ser.validation' = 0.004 holds out no pair of the 100 seed pairs"):
        validation_split(cfg, split)


@pytest.mark.parametrize("rule", ["paper", "code", "ssrm"])
def test_a_pool_pair_with_a_non_finite_reward_is_never_pseudo_labelled(rule):
    """Pairs 0, 2 and 4 have an inf or NaN reward: status 0, never selected (an inf reward is an overflow, not a
    certain preference); pair 3 (rewards 2 and -2, p = 0.88 and 0.12 at T = 1) is status 1 and selected."""
    from ser.config import Config
    from ser.evolve import select_pseudo_labels

    cfg = Config()
    cfg.ser.rule = rule
    r_a, r_b = np.array([np.inf, 0.1, np.nan, 2.0, -3.0]), np.array([0.0, 0.0, 0.0, -2.0, np.inf])
    status, _, take, _ = select_pseudo_labels(r_a, r_b, 0.0, 1.0, cfg, 5)
    assert status.tolist() == [0, 0, 0, 1, 0] and take.tolist() == [False, False, False, True, False]
