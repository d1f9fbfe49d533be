"""Shared fixtures: tiny random models on real tokenizers (milliseconds per step), and the real data."""

import os
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
# on CPUs without AVX512-BF16/AMX: there they run on a tiny model, never skipped).
BF16_CHECKS: list[str] = []


def fast_bf16() -> bool:
    """Whether this machine runs bf16 fast (`train.mixed_precision: auto` picks bf16)."""
    from ser.train import resolve_precision

    return resolve_precision("auto") == "bf16"


def pytest_terminal_summary(terminalreporter):
    if BF16_CHECKS:
        kind = ("fast bf16 (AVX512-BF16/AMX or a bf16 GPU)" if fast_bf16()
                else "no fast bf16 (emulated: the training checks used tiny models)")
        terminalreporter.write_line(f"bf16 checks on this machine, {kind}: " + "; ".join(sorted(set(BF16_CHECKS))))


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
