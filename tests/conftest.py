"""Shared fixtures: tiny random models on real tokenizers (milliseconds per step), the real data, and the one-process
real-MiniLM runs that several test files check (each made once per session)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ser.data import data_dirs  # noqa: E402  ($SER_DATA_DIR, then ../shared/data)

try:  # CI draws the same hypothesis examples on every run (a failure there is reproducible)
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:
    pass

# What the bf16 checks ran on, printed at the end of the run (bf16 is emulated, tens of times slower than fp32,
# on CPUs without AVX512-BF16/AMX: there they run on a tiny model, never skipped). A check records itself on its
# test's report (`note_bf16_check`), which pytest-xdist carries from a worker to the main process.
BF16_CHECKS: set[str] = set()


def note_bf16_check(request, what: str) -> None:
    """Name a bf16 check in the end-of-run summary line (kept in the test report's user_properties)."""
    request.node.user_properties.append(("bf16_check", what))


def fast_bf16() -> bool:
    """Whether this machine runs bf16 fast (`train.mixed_precision: auto` picks bf16)."""
    from ser.train import resolve_precision

    return resolve_precision("auto") == "bf16"


def pytest_runtest_logreport(report):
    BF16_CHECKS.update(value for key, value in report.user_properties if key == "bf16_check")


def pytest_terminal_summary(terminalreporter):
    if BF16_CHECKS:
        kind = ("fast bf16 (AVX512-BF16/AMX or a bf16 GPU)" if fast_bf16()
                else "no fast bf16 (emulated: the training checks used tiny models)")
        terminalreporter.write_line(f"bf16 checks on this machine, {kind}: " + "; ".join(sorted(BF16_CHECKS)))


# `make test` runs the suite on pytest-xdist workers (`-n 2 --dist loadfile --no-loadscope-reorder`): much of it is
# single-threaded (imports, process start-up, tokenizing, the launchers' rendezvous), so two workers keep both cores
# busy. A test file runs on one worker (its module-scoped fixtures are made once); the longest,
# tests/test_distributed.py, is collected first so that a worker starts on it at once. (Not `--dist loadgroup`:
# pytest-xdist 3.8 marks groups in `item._nodeid`, which pytest 9 no longer reads.) The one-process runs that
# several files share are made once for all workers (`one_process_run`).
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name != "test_distributed.py")  # stable: file order kept otherwise


if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # each worker takes its share of the cores, and so do the processes its tests start (two workers with all the
    # threads each would oversubscribe them)
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


SHARED_DATA = next((d for d in data_dirs() if (d / "hh-rlhf").exists()), data_dirs()[0])
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_frozen_cache():
    """Each test starts with an empty process-wide frozen-layer store (`ser.frozen.SHARED_MEMORY`): counts of
    cache hits and misses must not depend on which tests ran before."""
    from ser.frozen import SHARED_MEMORY

    SHARED_MEMORY.clear()
    yield
    SHARED_MEMORY.clear()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "hh-rlhf").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer random BERT base model with MiniLM's real WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ser.models import resolve_backbone

    tok = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    out = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_no_dropout_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    """`tiny_bert_dir` with dropout off (several processes must draw no different masks)."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    out = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's real BPE tokenizer (pad token: none; ser sets it)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ser.models import PACKAGED, _package_dir

    module, gguf = PACKAGED["smollm2-135m"]
    tok = AutoTokenizer.from_pretrained(_package_dir(module), gguf_file=gguf)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_bos_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """tiny_llama_dir with a tokenizer that adds bos (`add_bos_token`, as Llama 3's and Gemma's): its text pair
    template is `bos $A bos $B`, which ser must not put between prompt and answer."""
    import shutil

    from ser.models import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama-bos")
    shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
    tok = load_tokenizer(str(out))
    tok.add_bos_token = True
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def no_dropout_bert(tmp_path_factory) -> Path:
    """The packaged MiniLM with dropout switched off (dropout draws different masks in each process)."""
    from transformers import AutoModel, AutoTokenizer

    from ser.models import resolve_backbone

    model = AutoModel.from_pretrained(resolve_backbone("minilm"), hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
    out = tmp_path_factory.mktemp("minilm-no-dropout")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_backbone("minilm")).save_pretrained(out)
    return out


# A run that a test kills at a point it polls for (a checkpoint's temporary directory exists for milliseconds) starts
# at a lower CPU priority: while another pytest-xdist worker keeps the cores busy, the poller still gets its turn
# before the run moves past the point. `nice` execs the command, so the started pid is the run's own.
LOWER_PRIORITY = ["nice", "-n", "5"] if shutil.which("nice") else []
# One thread: the multi-process tests compare with these runs, one thread per process, so the kernels are the same.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# batch 6 over 81 pairs: 14 batches, the last of 3 pairs (uneven split across processes); accumulating 3
# batches per step gives 5 steps, the last of 2 batches. 64 tokens and 50 test pairs: the rm-tiny preset's data at
# under a third of its cost (these runs are made a dozen times by the multi-process tests).
TRAIN_RM = ["train-rm", "--config", "configs/rm-tiny.yaml", "--data.seed_size=81", "--data.test_size=50",
            "--model.max_length=64", "--train.batch_size=6", "--train.grad_accum=3", "--train.lr=1e-4",
            "--train.eval_every=2"]
# one iteration over a 96-pair pool at 64 tokens, 48 test pairs: the evolve-tiny preset's real data and model at
# about a third of its cost
EVOLVE = ["evolve", "--config", "configs/evolve-tiny.yaml", "--ser.max_iterations=1", "--data.pool_size=96",
          "--data.test_size=48", "--model.max_length=64"]


def one_process_run(tmp_path_factory, name: str, *args) -> Path:
    """`ser ARGS --out DIR` on one process and one thread, made once per session; returns DIR, its stdout in
    DIR/stdout.txt (written last: the run is complete). Under pytest-xdist the workers share DIR: the first to need
    it makes it under a file lock in the session's temporary directory, the others wait and read it
    (pytest-xdist's recipe for a session fixture made once)."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _run_once(tmp_path_factory.mktemp(name) / "one", args)
    session = tmp_path_factory.getbasetemp().parent  # this session's, shared by its workers
    with FileLock(str(session / f"{name}.lock")):
        out = session / f"{name}-shared" / "one"
        return out if (out / "stdout.txt").exists() else _run_once(out, args)


def _run_once(out: Path, args) -> Path:
    p = subprocess.run([sys.executable, "-m", "ser", *map(str, args), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, env=ONE_THREAD)
    if p.returncode != 0:  # a worker that needs it next runs it afresh (and shows its own error), not into this one
        shutil.rmtree(out, ignore_errors=True)
    assert p.returncode == 0, p.stderr[-3000:]
    (out / "stdout.txt").write_text(p.stdout)
    return out


@pytest.fixture(scope="session")
def train_rm_one(no_dropout_bert, shared_data, tmp_path_factory) -> Path:
    """TRAIN_RM on the real MiniLM (dropout off): the CLI round trip's RM and the multi-process reference."""
    return one_process_run(tmp_path_factory, "train-rm", *TRAIN_RM, f"--model.backbone={no_dropout_bert}")


@pytest.fixture(scope="session")
def evolve_one(no_dropout_bert, shared_data, tmp_path_factory) -> Path:
    """EVOLVE on the real MiniLM (dropout off): the CLI's SER run and the multi-process reference."""
    return one_process_run(tmp_path_factory, "evolve", *EVOLVE, f"--model.backbone={no_dropout_bert}")
