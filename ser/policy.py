"""The policy LM: loading, prompt formatting, generation and `ser sft` (supervised fine-tuning on the chosen
answers of a preference dataset, loss on the answer tokens only)."""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ser.checkpoint import (append_jsonl, atomic_dir, check_whole, check_writable, json_text, refuse_existing_run,
                            start_run)
from ser.config import Config, to_dict
from ser.errors import UserError
from ser.models import full_parameters, keep_eos_trainable, load_tokenizer, resolve_backbone, sharded

log = logging.getLogger(__name__)
_TURN = re.compile(r"\n\n(Human|Assistant|System): ")
_ROLE = {"Human": "user", "Assistant": "assistant", "System": "system"}


def load_policy(backbone: str, dtype=torch.float32):
    """(causal LM, tokenizer) for a short name, directory or Hub id; the tokenizer pads on the left for
    generation and uses eos as pad when it has none."""
    from transformers import AutoModelForCausalLM

    path = resolve_backbone(backbone)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    keep_eos_trainable(model, tokenizer)
    return model, tokenizer


def check_policy(backbone: str) -> None:
    """Fail now, as `load_policy` would later (a command that generates first would find out after the
    generation): an unknown backbone, or one without a tokenizer or a readable config. Raises UserError."""
    from transformers import AutoConfig

    path = resolve_backbone(backbone)
    load_tokenizer(path)
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a causal LM ({str(e).splitlines()[0]})") from None


def hh_messages(prompt: str) -> list[dict]:
    """An HH-RLHF style prompt ('\\n\\nHuman: ...\\n\\nAssistant:') as chat messages; the trailing empty
    assistant turn is dropped (the model writes it). Text without the markers is one user message."""
    text = prompt if prompt.startswith("\n\n") else "\n\n" + prompt
    text = re.sub(r"\n\nAssistant:\s*$", "", text) + "\n\n"
    parts = _TURN.split(text)
    if len(parts) < 3:
        return [{"role": "user", "content": prompt.strip()}]
    return [{"role": _ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def prompt_texts(tokenizer, prompts: list[str]) -> list[str]:
    """What the policy sees: the chat template with a generation prompt when the tokenizer has one, else the
    raw HH text (which already ends with 'Assistant:')."""
    if not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [tokenizer.apply_chat_template(hh_messages(p), tokenize=False, add_generation_prompt=True)
            for p in prompts]


def prompt_ids(tokenizer, text: str, max_prompt_length: int) -> list[int]:
    """A prompt text's token ids as the policy sees them: cut from the left to max_prompt_length, after the
    special tokens the tokenizer puts before a text (the bos of Llama, Mistral, Gemma; none for SmolLM2 or Qwen),
    which stay first (so at least the lead and one token). A chat template that writes the bos into the text
    already gets no second one."""
    from ser.models import causal_join, leading_ids

    lead = leading_ids(tokenizer) if causal_join(tokenizer) is not None else []
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if lead and ids[: len(lead)] == lead:
        ids = ids[len(lead) :]
    return lead + ids[-max(max_prompt_length - len(lead), 1) :]


def encode_prompts(tokenizer, prompts: list[str], max_prompt_length: int) -> dict:
    """Left-padded prompt ids and attention mask (B, P) of `prompt_ids` for each prompt's `prompt_texts`."""
    rows = [prompt_ids(tokenizer, t, max_prompt_length) for t in prompt_texts(tokenizer, prompts)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask}


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended) for generated tokens (B, T): the mask covers every token up to and including the first
    eos; `ended` is False for answers that hit the length limit without an eos."""
    is_eos = responses == eos_id
    ended = is_eos.any(-1)
    first = torch.where(ended, is_eos.int().argmax(-1), torch.full_like(ended, responses.shape[1], dtype=torch.long))
    mask = torch.arange(responses.shape[1], device=responses.device)[None] <= first[:, None]
    return mask.float(), ended


# generation settings that leave the sampled distribution alone: what generate() sets on every call, the special
# tokens, and bookkeeping (caching, what is returned)
_SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "max_length", "pad_token_id",
                  "bos_token_id", "eos_token_id", "transformers_version", "_from_model_config", "use_cache",
                  "cache_implementation", "output_attentions", "output_hidden_states", "output_scores",
                  "output_logits", "return_dict_in_generate"}


def plain_sampling(model) -> list[str]:
    """Replace the model's generation config with one that samples from logits / temperature alone, keeping only
    its special tokens. transformers fills every field a `generate` call leaves unset from `model.generation_config`
    (`GenerationMixin._prepare_generation_config`), so a checkpoint shipping e.g. `repetition_penalty` or
    `no_repeat_ngram_size` would sample from another distribution than the one PPO's log-probabilities are taken
    under (off-policy ratios and KL, silently). Returns the dropped settings as "name=value" (empty when none)."""
    from transformers import GenerationConfig

    old = model.generation_config
    dropped = [f"{k}={v!r}" for k, v in sorted(old.to_diff_dict().items()) if k not in _SAMPLING_KEYS]
    model.generation_config = GenerationConfig(bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id,
                                               pad_token_id=old.pad_token_id)
    return dropped


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], pcfg, *, do_sample: bool = True, seed: int | None = None):
    """Sample answers. Returns (prompt ids (B, P), response ids (B, T), response mask, ended, answer texts)."""
    enc = {k: v.to(model.device) for k, v in encode_prompts(tokenizer, prompts, pcfg.max_prompt_length).items()}
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    # top_k=0 and top_p=1.0 switch those filters off (None would fall back to the model's generation_config)
    # ZeRO-3 and FSDP gather parameters inside every forward pass: all processes keep stepping until all are done
    synced = torch.distributed.is_initialized() and sharded(model)
    out = model.generate(**enc, do_sample=do_sample, temperature=pcfg.temperature if do_sample else None,
                         top_k=pcfg.top_k if do_sample else None, top_p=pcfg.top_p if do_sample else None,
                         max_new_tokens=pcfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
    model.train(was_training)
    responses = out[:, enc["input_ids"].shape[1] :]
    mask, ended = response_mask(responses, tokenizer.eos_token_id)
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(responses, mask)]
    return enc, responses, mask, ended, texts


def save_policy(model, tokenizer, target: str | Path, cfg: Config, extra: dict | None = None) -> Path:
    """An HF causal-LM directory (safetensors), written atomically with a manifest."""
    check_whole(model)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(tmp)
        (tmp / "ser_config.json").write_text(json_text({"config": to_dict(cfg), **(extra or {})}, indent=2))
    return Path(target)


def sft_target(answer_ids: list[int], eos_id: int, max_length: int) -> list[int]:
    """The answer tokens SFT learns, at most max_length: the answer then eos, or, for an answer of max_length tokens
    or more, its first max_length tokens without eos (an eos after a cut would teach stopping mid-sentence)."""
    return answer_ids + [eos_id] if len(answer_ids) < max_length else answer_ids[:max_length]


def run_sft(cfg: Config, out: str) -> dict:
    """`ser sft`: fine-tune the policy on (prompt, chosen) of `data.train`'s training split; loss on the
    answer tokens (and the closing eos) only. Saves `OUT/policy`."""
    from accelerate.utils import set_seed

    from ser.pipeline import load_splits
    from ser.train import (epoch_order, length_grouped_batches, make_accelerator, micro_batch, prepare_for_training,
                           rank_share, step_totals)

    refuse_existing_run(out)  # every process, before anything is written
    set_seed(cfg.train.seed)
    split = load_splits(cfg.data)
    pairs = split.seed + split.pool  # everything but the test pairs
    model, tok = load_policy(cfg.policy.backbone)
    prompts = prompt_texts(tok, [p.prompt for p in pairs])
    rows = []
    for prompt, answer in zip(prompts, [p.chosen for p in pairs]):
        p_ids = prompt_ids(tok, prompt, cfg.policy.max_prompt_length)  # what generation will see
        answer = answer if prompt[-1:].isspace() or answer[:1].isspace() else " " + answer  # as the RM joins it
        rows.append((p_ids, sft_target(tok(answer, add_special_tokens=False)["input_ids"], tok.eos_token_id,
                                       cfg.model.max_length)))
    accelerator = make_accelerator(cfg.train)
    root = check_writable(out)
    if accelerator.is_main_process:
        start_run(root, "sft", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    accelerator.wait_for_everyone()
    lengths = [len(p) + len(a) for p, a in rows]
    batches = length_grouped_batches(epoch_order(len(rows), cfg.train.epochs, cfg.train.seed), lengths,
                                     cfg.train.batch_size, cfg.train.seed)

    def collate(idx):
        width = max(lengths[i] for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            p, a = rows[i]
            ids[j, : len(p) + len(a)] = torch.tensor(p + a)
            labels[j, len(p) : len(p) + len(a)] = torch.tensor(a)  # the answer and its eos; not the prompt
            mask[j, : len(p) + len(a)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    from transformers import get_scheduler

    accum = cfg.train.grad_accum
    steps = math.ceil(len(batches) / accum)
    step_tokens = step_totals([sum(len(rows[j][1]) for j in b) for b in batches], accum)  # answer tokens
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=round(cfg.train.warmup_ratio * steps),
                              num_training_steps=steps)
    model.train()
    model, optimizer = prepare_for_training(accelerator, model, optimizer)
    t0, step, losses, window = time.time(), 0, [], np.zeros(2)  # window: summed token loss, answer tokens
    for i, global_batch in enumerate(batches):
        # This process's rows; the loss is a sum over answer tokens divided by the count of the optimizer step's
        # (all its micro-batches', all processes'), so the mean over processes (DDP) and micro-batches is the
        # per-token mean of the whole step, as one batch on one process gives.
        idx, share = rank_share(global_batch, accelerator.process_index, accelerator.num_processes)
        batch = {k: v.to(accelerator.device) for k, v in collate(idx).items()}
        labels = batch.pop("labels")
        sync = (i + 1) % accum == 0 or i + 1 == len(batches)
        with micro_batch(accelerator, model, sync):
            logits = model(**batch).logits[:, :-1].float()
            token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                           ignore_index=-100, reduction="sum")
            loss = token_loss * (share > 0) * accelerator.num_processes / step_tokens[i]
            if not torch.isfinite(loss):
                raise UserError(f"sft: non-finite loss at step {step}; stopped (lower train.lr)")
            accelerator.backward(loss)
        window += [token_loss.item() * (share > 0), (labels[:, 1:] != -100).sum().item() * (share > 0)]
        if not sync:
            continue
        if cfg.train.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if accelerator.num_processes > 1:
            window = accelerator.reduce(torch.tensor(window, device=accelerator.device), reduction="sum").cpu().numpy()
        losses.append(float(window[0] / window[1]))
        window, step = np.zeros(2), step + 1
        if accelerator.is_main_process:
            append_jsonl(root / "metrics.jsonl", {"step": step, "sft/loss": losses[-1]})
    model = accelerator.unwrap_model(model)
    summary = {"steps": step, "pairs": len(rows), "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1),
               "seconds": time.time() - t0}
    with full_parameters(model):  # whole weights under ZeRO-3 / FSDP; every process enters
        if accelerator.is_main_process:
            save_policy(model, tok, root / "policy", cfg, {"sft": summary})
    log.info("sft: %d steps on %d answers, final loss %.4f, %.0fs", step, len(rows), summary["final_loss"],
             summary["seconds"])
    return summary
