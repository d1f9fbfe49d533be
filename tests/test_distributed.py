"""Several processes give the results of one: `torchrun` (gloo), DeepSpeed ZeRO-2/ZeRO-3 and FSDP2 (the shipped presets,
`accelerate launch`, over gloo: DeepSpeed's CPU backend, torch's `fully_shard` on CPU).

Scoring shards whole batches across the processes, so scores are bit-identical. Training splits every global
batch between the processes (`ser.train.rank_share`) and DDP / DeepSpeed average the gradients, so it is the
same computation up to float rounding: with dropout off the per-step losses agree to 1e-4 and the test accuracy
to one pair. All runs use one thread per process, so the kernels are the same. Under ZeRO-3 and FSDP every process
holds a shard of each parameter: these tests also show that training, scoring (which must run the same number
of forward passes on every process) and saving (gathered, never a shard) give the one-process results.
"""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import EVOLVE, LOWER_PRIORITY, ONE_THREAD, TRAIN_RM, note_bf16_check, one_process_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def command(procs: int | str, *args) -> list[str]:
    """`ser ARGS` on one process (procs=1), or on two under `torchrun` (2 or "torchrun") or `accelerate launch`
    with a shipped preset ("deepspeed-zero2", "deepspeed-zero3", "fsdp"; in fp32 unless ":bf16" is added, the
    presets' own setting)."""
    if procs == 1:
        return [sys.executable, "-m", "ser", *map(str, args)]
    if procs in (2, "torchrun"):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    else:
        with socket.socket() as sock:  # a free rendezvous port (accelerate's default is fixed)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        preset, _, precision = procs.partition(":")
        launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                    f"configs/accelerate/{preset}.yaml", "--num_processes=2", f"--mixed_precision={precision or 'no'}",
                    f"--main_process_port={port}"]
    return [*launcher, "-m", "ser", *map(str, args)]


def ser(procs: int | str, *args) -> str:
    p = subprocess.run(command(procs, *args), cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(path: Path, prefix: str = "") -> dict:
    """A saved model's tensors by name. A model saved under ZeRO-3 keeps the checkpoint's legacy LayerNorm names
    (gamma/beta: transformers loads either), mapped here to weight/bias."""
    from safetensors.torch import load_file

    legacy = lambda k: k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")  # noqa: E731
    return {prefix + legacy(k): v for k, v in load_file(path / "model.safetensors").items()}


def assert_same_weights(start: dict, one: dict, other: dict, at_least: int, min_move: float = 1e-5) -> None:
    """Both runs trained (moved from `start`) and ended at the same weights up to 1% of that movement. Scalar
    parameters are left out: a reward head's bias gets no gradient from a pairwise loss (it cancels), only
    rounding residue, which Adam scales up to steps of the learning rate."""
    shared = [k for k in start if k in one and one[k].numel() > 1]
    assert len(shared) >= at_least and all(one[k].shape == other[k].shape for k in shared)  # never a shard
    moved = np.mean([(one[k] - start[k]).abs().mean().item() for k in shared])
    apart = np.mean([(one[k] - other[k]).abs().mean().item() for k in shared])
    assert moved > min_move and apart < 0.01 * moved, (len(shared), moved, apart)


def assert_train_rm_matches_one(run: Path, one: Path, backbone: Path) -> None:
    """`run` (TRAIN_RM on 2 processes) ends where one process does: the same steps, per-step losses within 1e-4,
    saved weights within 1% of their change, test accuracy within one pair, reward statistics within 1e-3."""
    a, b = rows(one / "metrics.jsonl"), rows(run / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 5]  # 5 steps + final eval
    loss = lambda rs: np.array([r["train/loss"] for r in rs if "train/loss" in r])  # noqa: E731
    assert abs(loss(a)[0] - np.log(2)) < 0.05
    np.testing.assert_allclose(loss(b), loss(a), atol=1e-4)
    # the saved RMs: trained (far from the pretrained encoder) and the same up to rounding
    assert_same_weights(weights(backbone, "bert."), weights(one / "rm"), weights(run / "rm"), at_least=50)
    res1, res2 = (json.loads((d / "result.json").read_text()) for d in (one, run))
    assert abs(res1["test/accuracy"] - res2["test/accuracy"]) <= 1 / res1["test/n"] + 1e-9
    # the reward statistics saved with the RM are computed by all processes (sharded) under every engine
    stats = [json.loads((d / "rm" / "ser_config.json").read_text()) for d in (one, run)]
    assert abs(stats[0]["reward_mean"] - stats[1]["reward_mean"]) < 1e-3


def test_the_cli_closes_its_process_group_after_a_command_succeeds(tmp_path):
    """`ser.cli.main` destroys the process group a launched process joined once the command has returned 0: alive at
    interpreter teardown, gloo's threads now and then abort a finished run (SIGABRT; seen once in 25 CI runs, under
    ZeRO-3). After a failed command it is left alone (NCCL's shutdown may wait on the other ranks). A one-process
    gloo group; `ser.cli.run` replaced by a command that returns the exit code given in argv."""
    code = ("import sys, torch.distributed as dist; from ser import cli\n"
            "dist.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0, world_size=1)\n"
            "cli.run = lambda argv: int(argv[0]); sys.argv = ['ser', sys.argv[2]]\n"
            "try: cli.main()\nexcept SystemExit as e: print('exit', e.code, 'group', dist.is_initialized())\n"
            "cli.close_process_group()")  # closing twice: the second call finds no group, a no-op
    for exit_code, alive in ((0, False), (2, True)):
        p = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"store{exit_code}"), str(exit_code)], cwd=ROOT,
                           capture_output=True, text=True, env=ONE_THREAD)
        assert p.returncode == 0 and p.stdout.strip().endswith(f"exit {exit_code} group {alive}"), \
            (p.stdout[-500:], p.stderr[-2000:])


def test_train_rm_two_processes_match_one(train_rm_one, no_dropout_bert, tmp_path):
    """DDP under `torchrun`. ZeRO-3 and FSDP: the resume test below (the same comparison, through a SIGKILL);
    ZeRO-2: the LoRA test."""
    ser("torchrun", *TRAIN_RM, f"--model.backbone={no_dropout_bert}", "--out", tmp_path / "two")
    assert_train_rm_matches_one(tmp_path / "two", train_rm_one, no_dropout_bert)


@pytest.fixture(scope="module")
def bf16_backbone(request) -> Path:
    """The backbone of the bf16 checks: the real MiniLM where bf16 is fast; where it is emulated (tens of times
    slower than fp32), the tiny BERT on MiniLM's tokenizer: the same code paths, a cheap check."""
    from conftest import fast_bf16

    return request.getfixturevalue("no_dropout_bert" if fast_bf16() else "tiny_bert_no_dropout_dir")


@pytest.fixture(scope="module")
def train_rm_one_bf16(bf16_backbone, shared_data, tmp_path_factory) -> Path:
    return one_process_run(tmp_path_factory, "train-rm-bf16", *TRAIN_RM, f"--model.backbone={bf16_backbone}",
                           "--train.mixed_precision=bf16")


@pytest.mark.parametrize("engine", ["deepspeed-zero3", "fsdp"])
def test_shipped_preset_in_bf16(engine, train_rm_one_bf16, bf16_backbone, tmp_path, request):
    """The presets as shipped train in bf16. DeepSpeed then holds the whole module in bf16, FSDP computes in bf16
    from fp32 shards, the reward head too (one process: fp32 weights under autocast, fp32 head): the losses of
    one process to bf16 rounding, the test accuracy within 3 test pairs (the real MiniLM), and an RM that
    transformers loads
    (DeepSpeed's in bf16, FSDP's in fp32: its gathered shards)."""
    from conftest import fast_bf16

    note_bf16_check(request, f"DeepSpeed/FSDP train-rm on {'the real MiniLM' if fast_bf16() else 'a tiny BERT'}")
    args = [*TRAIN_RM, f"--model.backbone={bf16_backbone}", "--train.mixed_precision=bf16"]
    ser(f"{engine}:bf16", *args, "--out", tmp_path / "two")
    one, two = train_rm_one_bf16, tmp_path / "two"
    loss = lambda run: [r["train/loss"] for r in rows(run / "metrics.jsonl") if "train/loss" in r]  # noqa: E731
    np.testing.assert_allclose(loss(two), loss(one), atol=2e-3)
    acc = [json.loads((run / "result.json").read_text())["test/accuracy"] for run in (one, two)]
    # the tiny random BERT's rewards are nearly equal across answers: bf16 rounding flips or ties close pairs
    # (measured: 4 of 100 under FSDP, 18 under DeepSpeed's bf16 head), so there the per-step losses carry the check
    n = json.loads((one / "result.json").read_text())["test/n"]
    assert abs(acc[0] - acc[1]) <= 3 / n + 1e-9 or not fast_bf16()
    import torch
    from transformers import AutoModelForSequenceClassification

    dtype = torch.bfloat16 if engine.startswith("deepspeed") else torch.float32
    assert {v.dtype for v in weights(tmp_path / "two" / "rm").values()} == {dtype}
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "two" / "rm")
    assert rm.config.num_labels == 1


def test_lora_under_zero2_matches_one_process_and_sharded_weights_are_refused(no_dropout_bert, shared_data,
                                                                               tmp_path):
    """The paper-scale preset's setting (LoRA, ZeRO-2), LoRA dropout off: the losses of one process. ZeRO-3 and
    FSDP cannot merge the adapters of sharded weights: refused with a one-line error before any write."""
    args = ["train-rm", "--config", "configs/rm-tiny.yaml", f"--model.backbone={no_dropout_bert}",
            "--data.seed_size=80", "--train.batch_size=8", "--model.max_length=64",  # 10 steps, a third of the preset
            "--model.mode=lora", "--model.lora_dropout=0", "--train.lr=1e-3"]
    ser(1, *args, "--out", tmp_path / "one")
    ser("deepspeed-zero2", *args, "--out", tmp_path / "two")
    loss = lambda run: [r["train/loss"] for r in rows(tmp_path / run / "metrics.jsonl") if "train/loss" in r]  # noqa: E731
    assert len(loss("one")) == 10
    np.testing.assert_allclose(loss("two"), loss("one"), atol=1e-4)
    with pytest.raises(AssertionError, match="error: model.mode=lora is not supported under DeepSpeed ZeRO-3"):
        ser("deepspeed-zero3", *args, "--out", tmp_path / "three")
    assert not (tmp_path / "three").exists()  # refused before its first write
    # FSDP: the same check (`check_lora_sharding`, called before the first write), on its accelerator state alone
    # (a launch of its own cost 20 s of the suite on 2 slow cores)
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ser.config import load_config
    from ser.errors import UserError
    from ser.pipeline import check_lora_sharding

    fsdp = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), distributed_type=DistributedType.FSDP)
    with pytest.raises(UserError, match="model.mode=lora is not supported under FSDP"):
        check_lora_sharding(load_config(None, ["model.mode=lora"]), fsdp)
    check_lora_sharding(load_config(None, ["model.mode=full"]), fsdp)


@pytest.mark.parametrize("engine", ["deepspeed-zero3", "fsdp"])
def test_sharded_train_rm_matches_one_process_through_sigkill_and_resume(engine, train_rm_one, no_dropout_bert,
                                                                         tmp_path):
    """ZeRO-3 / FSDP, the shipped presets in fp32. Mid-training checkpoints: every process writes its partition
    of the weights and optimizer state into the main process's atomic directory. The whole launch killed with
    SIGKILL after the step-2 checkpoint, then resumed, ends where one uninterrupted process does."""
    args = [*TRAIN_RM, f"--model.backbone={no_dropout_bert}", "--train.save_every=2"]
    run = tmp_path / "run"
    proc = subprocess.Popen([*LOWER_PRIORITY, *command(engine, *args, "--out", run)], cwd=ROOT, env=ONE_THREAD,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while '"step": 3,' not in ((run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""):
        assert proc.poll() is None and time.time() - t0 < 300, "the run ended before the kill point"
        time.sleep(0.01)
    import psutil

    launcher = psutil.Process(proc.pid)
    everyone = [*launcher.children(recursive=True), launcher]  # the workers are in sessions of their own
    for p in everyone:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(everyone, timeout=30)
    assert json.loads((run / "checkpoint" / "step.json").read_text())["step"] == 2
    assert not (run / "result.json").exists()
    # the partitions belong to 2 processes: resuming on 1 plain process is refused, not run from scratch (the
    # CLI's own code, in this process: the refusal comes before any model is loaded)
    from ser.cli import run as cli_run
    from ser.errors import UserError

    name = "DeepSpeed" if engine.startswith("deepspeed") else "FSDP"
    with pytest.raises(UserError, match=f"written by {name} on 2 processes; resume it the same way"):
        cli_run(["train-rm", "--resume", str(run)])
    ser(engine, "train-rm", "--resume", run)
    assert_train_rm_matches_one(run, train_rm_one, no_dropout_bert)  # the lines after the checkpoint redone once
    assert not (run / "checkpoint").exists()


def test_score_two_processes_identical(train_rm_one, tmp_path):
    """Scoring a saved RM: sharded batches, gathered in input order, bit-identical."""
    for procs in (1, 2):
        ser(procs, "score", "--rm", train_rm_one / "rm", "--data", "hh-rlhf:helpful-online", "--limit", 50,
            "--batch-size", 8, "--out", tmp_path / f"scores{procs}.jsonl")
    s1, s2 = rows(tmp_path / "scores1.jsonl"), rows(tmp_path / "scores2.jsonl")
    assert len(s1) == 50 and s1 == s2


def test_scoring_runs_equal_forward_passes_on_every_process():
    """ZeRO-3 gathers the parameters inside every forward pass, with all processes: a process with fewer
    batches repeats one and discards it. 5 batches over 2 processes: 3 passes each, every batch kept once."""
    from ser.scoring import my_batches

    a, b = my_batches(10, 2, 0, 2), my_batches(10, 2, 1, 2)
    assert a == [(0, True), (4, True), (8, True)] and b == [(2, True), (6, True), (0, False)]
    assert my_batches(3, 8, 1, 2) == [(0, False)]  # one batch, two processes


@pytest.mark.parametrize("engine", ["torchrun", "deepspeed-zero3", "fsdp"])
def test_evolve_two_processes_match_one(engine, evolve_one, no_dropout_bert, tmp_path):
    """Pool scoring sharded and gathered, retraining on 2 processes: the same pseudo-labels and accuracies.
    Under ZeRO-3 the iteration-0 RM is loaded sharded and scored through an inference engine; under FSDP it is
    loaded whole by every process, and the RM retrained from it is sharded."""
    ser(engine, *EVOLVE, f"--model.backbone={no_dropout_bert}", "--out", tmp_path / "two")
    it = lambda run: [r for r in rows(run / "metrics.jsonl") if "rm/acc" in r]  # noqa: E731
    one, two = it(evolve_one), it(tmp_path / "two")
    assert [r["iteration"] for r in one] == [r["iteration"] for r in two] == [0, 1]
    assert one[1]["ser/added"] > 0 and one[1]["ser/added"] == two[1]["ser/added"]
    for a, b in zip(one, two):
        assert abs(a["rm/acc"] - b["rm/acc"]) <= 1 / 48 + 1e-9  # one of EVOLVE's 48 test pairs
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-3
    s1, s2 = (json.loads((d / "state.json").read_text())["pseudo"] for d in (evolve_one, tmp_path / "two"))
    assert [p[:2] for p in s1] == [p[:2] for p in s2]  # the same pairs, the same labels
    np.testing.assert_allclose([p[2] for p in s1], [p[2] for p in s2], atol=1e-4)  # P(label), sharded rounding
    assert_same_weights(weights(no_dropout_bert, "bert."), weights(evolve_one / "final"),
                        weights(tmp_path / "two" / "final"), at_least=50)


SFT = ["sft", "--config", "configs/sft-smollm2-hh.yaml", "--data.limit=40", "--data.test_size=8",
       "--model.max_length=24", "--policy.max_prompt_length=32", "--train.batch_size=6", "--train.lr=1e-3",
       "--train.epochs=1", "--train.mixed_precision=\"no\""]


@pytest.fixture(scope="module")
def sft_one(tiny_llama_dir, shared_data, tmp_path_factory) -> Path:
    return one_process_run(tmp_path_factory, "sft", *SFT, f"--policy.backbone={tiny_llama_dir}")


@pytest.mark.parametrize("engine", ["torchrun", "deepspeed-zero3", "fsdp"])
def test_sft_two_processes_match_one(engine, sft_one, tiny_llama_dir, tmp_path):
    ser(engine, *SFT, f"--policy.backbone={tiny_llama_dir}", "--out", tmp_path / "two")
    one, two = rows(sft_one / "metrics.jsonl"), rows(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 6  # 32 answers in batches of 6
    np.testing.assert_allclose([r["sft/loss"] for r in two], [r["sft/loss"] for r in one], atol=1e-4)
    # the saved policies: trained (far from the initial weights) and the same up to rounding
    assert_same_weights(weights(tiny_llama_dir), weights(sft_one / "policy"), weights(tmp_path / "two" / "policy"),
                        at_least=20)


def test_ppo_under_two_processes(tiny_llama_dir, tiny_bert_dir, shared_data, tmp_path, request):
    """Each process rolls out its own prompts; gradients are averaged, statistics reduced, one writer. DDP, ZeRO-3
    and FSDP (sharded policy + value head, generation with all processes in step) reach the same checkpoint."""
    from ser.checkpoint import save_reward_model
    from ser.models import load_reward_model

    rm, tok = load_reward_model(str(tiny_bert_dir))
    save_reward_model(rm, tok, tmp_path / "rm", {"config": {"model": {"max_length": 64}}})
    engines = ("torchrun", "deepspeed-zero3", "fsdp")
    for engine in engines:
        ser(engine, "ppo", f"--policy.backbone={tiny_llama_dir}", f"--ppo.rm={tmp_path / 'rm'}", "--ppo.steps=2",
            "--ppo.batch_size=2", "--ppo.mini_batch_size=2", "--policy.max_new_tokens=6",
            "--policy.max_prompt_length=24", "--data.limit=40", "--data.test_size=8", "--out", tmp_path / engine)
    ddp, *sharded = (rows(tmp_path / engine / "metrics.jsonl") for engine in engines)
    assert all(np.isfinite(r["ppo/kl"]) for r in ddp)
    for engine, run in zip(engines[1:], sharded):
        assert [r["step"] for r in ddp] == [r["step"] for r in run] == [1, 2]
        for key in ("ppo/score", "ppo/policy_loss", "ppo/value_loss"):
            np.testing.assert_allclose([r[key] for r in run], [r[key] for r in ddp], atol=1e-5)
        assert_same_weights(weights(tiny_llama_dir), weights(tmp_path / "torchrun" / "checkpoint"),
                            weights(tmp_path / engine / "checkpoint"), at_least=20, min_move=1e-6)
    assert (tmp_path / "torchrun" / "checkpoint" / "manifest.json").exists()
    note_bf16_check(request, "FSDP PPO on a tiny Llama")
    # bf16 as the presets ship: the policy computes with bf16 weights, and so does the reference, so the KL at the
    # first rollout (policy == reference) is exactly 0 (it was 1e-3 under FSDP with an fp32 reference)
    ser("fsdp:bf16", "ppo", f"--policy.backbone={tiny_llama_dir}", f"--ppo.rm={tmp_path / 'rm'}", "--ppo.steps=1",
        "--ppo.batch_size=2", "--ppo.mini_batch_size=2", "--policy.max_new_tokens=6", "--policy.max_prompt_length=24",
        "--data.limit=40", "--data.test_size=8", "--train.mixed_precision=bf16", "--out", tmp_path / "bf16")
    assert rows(tmp_path / "bf16" / "metrics.jsonl")[0]["ppo/kl"] == 0.0
