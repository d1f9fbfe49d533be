"""Reward-model training: a plain PyTorch loop on `accelerate` with the pairwise (Bradley–Terry) loss.

The same loop runs on one CPU, under `torchrun` with N processes (DDP) and under DeepSpeed ZeRO or FSDP2
(`accelerate launch`): device placement, model wrapping and mixed precision come from `Accelerator`; the loop
itself deals each global batch out to the processes (`rank_share`) and accumulates gradients, so N processes
compute what one does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs,
                               broadcast_object_list, gather_object)
from tqdm.auto import tqdm

from ser.checkpoint import atomic_dir, restore_swapped, verify_manifest
from ser.config import TrainConfig
from ser.errors import UserError
from ser.frozen import cache_of
from ser.losses import pairwise_losses, soft_pairwise_losses
from ser.models import (can_share_prompt, collate, encode_pairs, fp32_head, pack_pairs, packed_pair_rewards,
                        zero3_parameters)

log = logging.getLogger(__name__)


def resolve_precision(name: str) -> str:
    """`auto` -> bf16 where the hardware runs it fast (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX),
    else no (fp32). Other values pass through."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        # emulation counts as "supported" by default (a T4 or V100 would get slow bf16): native bf16 only (Ampere+)
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    fast = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if fast else "no"


def make_accelerator(tcfg: TrainConfig) -> Accelerator:
    """Device placement, DDP/DeepSpeed/FSDP wrapping and mixed precision. The loops below shard the data and
    accumulate gradients themselves (`rank_share`), so `train.batch_size` is the global batch and a run
    gives the same result on 1 or N processes (up to float rounding; in bf16, model.mode=freeze differs more: one
    process runs the frozen layers in fp32 through the cache, several run them under bf16 autocast)."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    no_gpu = not torch.accelerator.is_available()
    if fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP1 is not supported by ser; set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
    if fsdp and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        # transformers then loads every model on the meta device outside the first process, also the ones ser
        # only scores with (evolve's pool scoring, PPO's reference and reward models), which FSDP never fills
        raise UserError("fsdp_cpu_ram_efficient_loading: true is not supported by ser (models loaded only for "
                        "scoring would be empty outside the first process); set it to false")
    # Without a GPU the processes join through gloo: plain runs (`torchrun`) as accelerate's MULTI_CPU, DeepSpeed
    # runs (`accelerate launch --config_file configs/accelerate/deepspeed-*.yaml`) on DeepSpeed's CPU backend
    # (accelerate turns DeepSpeed off when cpu=True).
    if resolve_precision(tcfg.mixed_precision) == "fp16" and no_gpu:  # accelerate would train in fp32 silently
        raise UserError("config: 'train.mixed_precision' = fp16 needs a GPU; on a CPU use auto, bf16 or no")
    accelerator = Accelerator(mixed_precision=resolve_precision(tcfg.mixed_precision), cpu=no_gpu and not deepspeed,
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if no_gpu and deepspeed else [])
    if fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate enables FSDP only on GPUs; FSDP2 itself shards over gloo on CPUs, so a CPU launch of
        # configs/accelerate/fsdp.yaml runs the same wrapping, sharding and saving code as on GPUs.
        plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if accelerator.state.deepspeed_plugin is not None:
        # The engine's batch bookkeeping (no loader is given to it; `micro_batch` marks the accumulation
        # boundaries, so its own count stays 1); clipping is the engine's job under DeepSpeed.
        micro = max(1, tcfg.batch_size // accelerator.num_processes)
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=micro, train_batch_size=micro * accelerator.num_processes,
            gradient_accumulation_steps=1, gradient_clipping=tcfg.max_grad_norm)
    return accelerator


def sharded_engine(accelerator: Accelerator) -> str:
    """The engine that splits weights or optimizer state across processes ("" for DDP or one process): its
    checkpoints are written per process (`accelerator.save_state`) and resume only on the same launch."""
    engines = {DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.FSDP: "FSDP"}
    return engines.get(accelerator.distributed_type, "")


def fsdp_units(model) -> list[str]:
    """The module classes FSDP shards as one unit each: the model's `_no_split_modules` (its transformer blocks),
    except a block that holds the input embedding. accelerate 1.15 shards that embedding as a unit of its own
    after the blocks, and fails when it is already inside one (BERT's BertEmbeddings)."""
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    holds = {type(m).__name__ for m in model.modules() if embedding is not None
             and any(c is embedding for c in m.modules())}
    return [c for c in getattr(model, "_no_split_modules", None) or [] if c not in holds]


def prepare_for_training(accelerator: Accelerator, model, optimizer):
    """`accelerator.prepare(model, optimizer)`; under FSDP, sharded in `fsdp_units` unless the launch names its
    own (`fsdp_transformer_layer_cls_to_wrap`)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)  # set under FSDP only
    if accelerator.distributed_type == DistributedType.FSDP and plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = fsdp_units(model)
    return accelerator.prepare(model, optimizer)


def compute_dtype(accelerator: Accelerator, model) -> torch.dtype:
    """The dtype a prepared model's weights compute in: FSDP's mixed precision gathers its fp32 shards in its
    param_dtype (bf16); otherwise the dtype they are stored in (DeepSpeed's bf16 mode stores them in bf16)."""
    policy = getattr(getattr(accelerator.state, "fsdp_plugin", None), "mixed_precision_policy", None)
    return getattr(policy, "param_dtype", None) or next(model.parameters()).dtype


def prepare_for_scoring(model, accelerator: Accelerator):
    """A model loaded for scoring on this process. Under DeepSpeed ZeRO-3, `from_pretrained` loads only this
    process's shard of each parameter; an inference engine (no optimizer) then gathers them inside each forward
    pass, so every process must score the same number of batches (`ser.scoring.my_batches` does). Under FSDP
    and DDP every process holds the whole model."""
    if zero3_parameters(model):
        return accelerator.unwrap_model(accelerator.prepare(model))
    return model.to(accelerator.device)


@contextlib.contextmanager
def micro_batch(accelerator: Accelerator, model, sync: bool):
    """Forward and backward of one micro-batch. Unless `sync` (the last micro-batch of an optimizer step) the
    gradients only accumulate: DDP skips its all-reduce (`no_sync`) and the DeepSpeed engine, which steps
    inside `accelerator.backward`, is told this is not an accumulation boundary."""
    accelerator.gradient_state._set_sync_gradients(sync)  # what accelerate 1.15's DeepSpeed backward reads
    try:
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def rank_share(batch: list[int], rank: int, world: int, total: float | None = None) -> tuple[list[int], float]:
    """This process's rows of a global batch, and the weight that turns their summed loss into its share of
    the mean over `total` rows (default: this batch's; under gradient accumulation, the optimizer step's, from
    `step_totals`): DDP averages gradients over the `world` processes, so weight = world / total gives that mean,
    as on one process. A process left without rows recomputes the first row with weight 0 (every process must
    run forward and backward)."""
    mine = batch[rank::world]
    return (mine, world / (total or len(batch))) if mine else (batch[:1], 0.0)


def step_totals(sizes: list[float], accum: int) -> list[float]:
    """For each micro-batch of `sizes` (its pairs, or its answer tokens), the summed size of the optimizer step it
    belongs to, with `accum` micro-batches per step (the last step may have fewer). Dividing every micro-batch's
    summed loss by this makes the step's gradient the mean over all of its rows, as one batch of them gives; the
    mean of the micro-batches' own means over-weights the rows of a shorter micro-batch (the gradient-accumulation
    fix of transformers 4.46, its `num_items_in_batch`). Example: sizes [4, 4, 2], accum 2 -> [8, 8, 2]."""
    totals: list[float] = []
    for start in range(0, len(sizes), accum):
        step = sizes[start : start + accum]
        totals += [sum(step)] * len(step)
    return totals


def epoch_order(n: int, epochs: float, seed: int) -> list[list[int]]:
    """Indices 0..n-1 for `epochs` passes, one list per epoch, each reshuffled (deterministic); the last epoch is
    partial, so round(epochs * n) indices in all (at least 1)."""
    g = torch.Generator().manual_seed(seed)
    left, order = max(1, round(epochs * n)), []
    while left > 0:
        order.append(torch.randperm(n, generator=g).tolist()[:left])
        left -= len(order[-1])
    return order


def length_grouped_batches(epochs: list[list[int]], lengths: list[int], batch_size: int, seed: int,
                           group: int = 32) -> list[list[int]]:
    """Batches of similar length, so little compute goes to padding (HF's `group_by_length`), epoch by epoch
    (`epoch_order`): windows of `group` batches of an epoch's shuffled order are sorted by length and cut into
    batches, and the epoch's batches are shuffled, so training sees no length curriculum. A window never spans two
    epochs: a pair's copies, of equal length, would sort side by side into one batch. Every index of every epoch
    is used exactly once, in its epoch."""
    batches, window = [], group * batch_size
    g = torch.Generator().manual_seed(seed + 1)
    for order in epochs:
        epoch = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
            epoch += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        batches += [epoch[i] for i in torch.randperm(len(epoch), generator=g).tolist()]
    return batches


def save_train_state(directory: Path, accelerator: Accelerator, rm, optimizer, scheduler, step: int,
                     losses: list[float], totals: np.ndarray, seconds: float = 0.0) -> None:
    """A resumable mid-training checkpoint, written atomically with a manifest: weights, optimizer, schedule,
    the step, the running statistics, the wall seconds trained so far (all segments) and every process's RNG
    states (dropout continues exactly) and an fp16 loss scaler's state (`accelerator.scaler`: its scale and growth
    count, so a resumed GPU run skips the steps the uninterrupted one skips). Under DeepSpeed each process
    writes its own partition of the weights and optimizer state (`accelerator.save_state`) into the main
    process's temporary directory; so does FSDP."""
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)
    rng = gather_object([[torch.get_rng_state(), cuda_rng]])  # one per process, in rank order
    sharded, main = sharded_engine(accelerator), accelerator.is_main_process
    with atomic_dir(directory) if main else contextlib.nullcontext() as tmp:
        if sharded:
            tmp = broadcast_object_list([tmp])[0]
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()  # every partition is written before the manifest
        if main:
            state = {"scheduler": scheduler.state_dict(), "step": step, "losses": losses, "totals": totals.tolist(),
                     "rng": rng, "launch": launch(accelerator), "seconds": seconds}
            if not sharded:
                state |= {"model": accelerator.unwrap_model(rm).state_dict(), "optimizer": optimizer.state_dict()}
                if getattr(accelerator, "scaler", None) is not None:  # fp16 (sharded: in accelerate's save_state)
                    state["scaler"] = accelerator.scaler.state_dict()
            torch.save(state, tmp / "train_state.pt")
            (tmp / "step.json").write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()


def launch(accelerator: Accelerator) -> str:
    """How the processes hold a checkpoint's weights and optimizer state (sharded ones depend on the count)."""
    engine = sharded_engine(accelerator)
    return f"{engine} on {accelerator.num_processes} processes" if engine else "a run without DeepSpeed or FSDP"


def load_train_state(directory: Path, rm, optimizer, scheduler, rank: int, launched: str, scaler=None) -> dict:
    """Restore what `save_train_state` wrote (before `accelerator.prepare`; a DeepSpeed or FSDP checkpoint's
    weights and optimizer state are loaded after it, by `accelerator.load_state`). A corrupt checkpoint, or one
    written by another launch (`launch`: partitions depend on the engine and the number of processes), is an
    error."""
    verify_manifest(directory)
    state = torch.load(directory / "train_state.pt", weights_only=True, map_location="cpu")
    written = state.get("launch", "an earlier version of ser")
    if written != launched:
        raise UserError(f"{directory}: written by {written}; resume it the same way (this is {launched})")
    if "model" in state:
        rm.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state and scaler is not None:
        scaler.load_state_dict(state["scaler"])
    scheduler.load_state_dict(state["scheduler"])
    cpu_rng, cuda_rng = state["rng"][rank % len(state["rng"])]
    torch.set_rng_state(cpu_rng)
    if torch.cuda.is_available() and cuda_rng.numel():
        torch.cuda.set_rng_state(cuda_rng)
    return state


def checkpoint_step(directory: Path) -> int:
    """The step a mid-training checkpoint was taken at (0: none)."""
    return json.loads((directory / "step.json").read_text())["step"] if (directory / "step.json").exists() else 0


def train_reward_model(rm, tokenizer, prompts, chosen, rejected, tcfg: TrainConfig, max_length: int, *,
                       accelerator: Accelerator, pseudo=None, pseudo_loss: tuple[str, float] = ("sigmoid", 0.0),
                       pseudo_target=None, epochs: float | None = None, on_step=None, share_prompt: bool = True,
                       checkpoint: Path | None = None, desc: str = "train") -> tuple[object, dict]:
    """Train `rm` in place on pairs (prompt, chosen, rejected); returns (unwrapped rm, summary).

    pseudo: optional bool per pair; pseudo-labelled pairs use `pseudo_loss` = (kind, margin), human pairs
    use tcfg.loss / tcfg.margin. pseudo_target: optional float per pair in [0, 1], the probability that its
    chosen answer is the better one; pseudo-labelled pairs then train with the soft Bradley-Terry cross-entropy
    (`losses.soft_pairwise_losses`) instead of `pseudo_loss`. on_step(step, record, rm): called after every optimizer step (logging,
    periodic evaluation). share_prompt: causal RMs run each pair as one packed sequence (`pack_pairs`).
    checkpoint: a directory for a resumable state every `tcfg.save_every` steps; training continues from it
    when it exists (the same batches, schedule and RNG: the result equals an uninterrupted run).
    A `ser.frozen.FrozenCache` attached to `rm` (model.mode=freeze) replaces the frozen layers' forward by cached
    states (one process only; packed pairs through `FrozenCache.pair_rewards`).
    """
    n = len(prompts)
    if n == 0:
        raise UserError("no training pairs")
    epochs = tcfg.epochs if epochs is None else epochs
    t0 = time.time()
    # Tokenize once: chosen sequences are 0..n-1 and rejected n..2n-1, both with the same prompt tokens.
    enc = encode_pairs(tokenizer, list(prompts), list(chosen), list(rejected), max_length)
    cache = cache_of(rm)
    if cache is not None and accelerator.num_processes > 1:
        raise UserError(f"{desc}: the frozen-layer cache (model.mode=freeze) runs on one process; detach it")
    packed = share_prompt and can_share_prompt(rm, tokenizer)
    if enc.truncated_answers:
        log.warning("%d of %d answers exceed max_length=%d on their own and were cut at the end",
                    enc.truncated_answers, 2 * n, max_length)
    if enc.truncated_prompts:
        log.info("%d of %d prompts were cut from the left to fit max_length=%d", enc.truncated_prompts, 2 * n,
                 max_length)
    losses: list[float] = []  # per optimizer step
    is_pseudo = torch.zeros(n, dtype=torch.bool) if pseudo is None else torch.as_tensor(np.asarray(pseudo, bool))
    target = None if pseudo_target is None else torch.as_tensor(np.asarray(pseudo_target, np.float32))  # (n,)

    def collate_pairs(idx: list[int]) -> dict:
        if packed and cache is not None:  # `FrozenCache.pair_rewards` packs the cached states itself
            batch = {}
        elif packed:  # (B, T) rows [prompt, chosen, rejected]
            batch = pack_pairs([enc.input_ids[i] for i in idx], [enc.input_ids[i + n] for i in idx],
                               [enc.prompt_lengths[i] for i in idx], tokenizer.pad_token_id)
        else:  # (2B, T): chosen rows first, then rejected
            seqs = idx + [i + n for i in idx]
            tt = [enc.token_type_ids[i] for i in seqs] if enc.token_type_ids is not None else None
            batch = collate([enc.input_ids[i] for i in seqs], tt, tokenizer.pad_token_id)
        batch["pseudo"] = is_pseudo[idx]
        if target is not None:
            batch["target"] = target[idx]
        return batch

    if packed:
        pair_len = [len(enc.input_ids[i]) + len(enc.input_ids[i + n]) - enc.prompt_lengths[i] for i in range(n)]
    else:
        pair_len = [max(len(enc.input_ids[i]), len(enc.input_ids[i + n])) for i in range(n)]
    # Pairs whose two sequences are identical (warned by encode_pairs) carry no preference: left out, counted.
    skip = set(enc.no_preference)
    if len(skip) == n:
        raise UserError(f"{desc}: all {n} training pairs have identical answers after tokenization or truncation "
                        f"to max_length={max_length}; nothing to learn")
    if skip:
        log.warning("%s: left %d of %d pairs with no preference (identical token ids) out of training", desc,
                    len(skip), n)
    kept = [i for i in range(n) if i not in skip]  # epochs (a fraction too) are of the pairs that train
    order = [[kept[j] for j in epoch] for epoch in epoch_order(len(kept), epochs, tcfg.seed)]
    batches = length_grouped_batches(order, pair_len, tcfg.batch_size, tcfg.seed)
    steps = math.ceil(len(batches) / tcfg.grad_accum)
    step_pairs = step_totals([len(b) for b in batches], tcfg.grad_accum)  # pairs in each micro-batch's step
    params = [p for p in rm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    from transformers import get_scheduler

    schedule = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[tcfg.schedule]
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=round(tcfg.warmup_ratio * steps),
                              num_training_steps=steps)
    rm.train()
    step, window, totals = 0, [], np.zeros(3)  # totals: summed loss, pairs, correct pairs
    before = 0.0  # wall seconds of earlier segments of this training (a resumed run)
    if checkpoint is not None and restore_swapped(checkpoint).exists():
        state = load_train_state(checkpoint, rm, optimizer, scheduler, accelerator.process_index, launch(accelerator),
                                 getattr(accelerator, "scaler", None))
        step, losses, totals = state["step"], list(state["losses"]), np.array(state["totals"])
        before = float(state.get("seconds", 0.0))
        log.info("%s: resumed from %s at step %d of %d", desc, checkpoint, step, steps)
    rm, optimizer = prepare_for_training(accelerator, rm, optimizer)
    params = [p for p in rm.parameters() if p.requires_grad]  # FSDP replaces them with its shards
    if step and sharded_engine(accelerator):
        accelerator.load_state(str(checkpoint))  # each process's partition of the weights and optimizer state
    done = step * tcfg.grad_accum  # micro-batches already trained (before the checkpoint)
    bar = tqdm(total=steps, initial=step, desc=desc, disable=not sys.stderr.isatty() or not accelerator.is_main_process)
    for i, global_batch in enumerate(batches):
        if i < done:
            continue
        idx, weight = rank_share(global_batch, accelerator.process_index, accelerator.num_processes,
                                 step_pairs[i])
        batch = {k: v.to(accelerator.device) for k, v in collate_pairs(idx).items()}
        pseudo_mask, soft = batch.pop("pseudo"), batch.pop("target", None)
        sync = (i + 1) % tcfg.grad_accum == 0 or i + 1 == len(batches)
        # the reward head in fp32 under bf16 autocast, as in scoring: rewards not rounded to bf16 (close margins
        # would become exact ties, the loss log 2)
        with micro_batch(accelerator, rm, sync), fp32_head(rm, accelerator.mixed_precision == "bf16"):
            if packed and cache is not None:  # the top layers and the head on cached frozen states, packed
                with accelerator.autocast():  # what the prepared model's own forward runs under
                    r_chosen, r_rejected = (r.float() for r in cache.pair_rewards(
                        rm, [enc.input_ids[i] for i in idx], [enc.input_ids[i + n] for i in idx],
                        [enc.prompt_lengths[i] for i in idx], tokenizer.pad_token_id, max_length))
            elif packed:
                r_chosen, r_rejected = packed_pair_rewards(rm, batch)
            elif cache is not None:  # the top layers and the head on cached frozen states
                seqs = idx + [i + n for i in idx]
                tt = [enc.token_type_ids[i] for i in seqs] if enc.token_type_ids is not None else None
                with accelerator.autocast():  # what the prepared model's own forward runs under
                    r_chosen, r_rejected = cache.rewards(rm, [enc.input_ids[i] for i in seqs], tt,
                                                         tokenizer.pad_token_id, max_length).float().chunk(2)
            else:
                r_chosen, r_rejected = rm(**batch).logits[:, 0].float().chunk(2)  # (2B,) -> (B,), (B,)
            margins = r_chosen - r_rejected  # (B,)
            human = pairwise_losses(margins, tcfg.loss, tcfg.margin)
            machine = (pairwise_losses(margins, *pseudo_loss) if soft is None
                       else soft_pairwise_losses(r_chosen, r_rejected, soft))
            per_pair = torch.where(pseudo_mask, machine, human)
            loss = per_pair.sum() * weight  # averaged over processes by DDP: the mean over the step's pairs
            if not torch.isfinite(loss):
                raise UserError(f"{desc}: non-finite loss ({loss.item()}) at step {step + 1}; stopped before "
                                f"corrupting the model (lower train.lr or check the data)")
            accelerator.backward(loss)
        mine = float(weight > 0)
        window.append([per_pair.sum().item() * mine, len(idx) * mine, (margins > 0).sum().item() * mine])
        if not sync:
            continue
        if tcfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, tcfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this step trains with (after scheduler.step(), the next one's)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 on a GPU: the grad scaler skipped an overflowing step
            scheduler.step()
        optimizer.zero_grad()
        stats = np.sum(window, axis=0)
        if accelerator.num_processes > 1:  # the step's loss and accuracy over all processes
            stats = accelerator.reduce(torch.tensor(stats, device=accelerator.device), reduction="sum").cpu().numpy()
        totals, window, step = totals + stats, [], step + 1
        bar.update(1)
        record = {"step": step, "train/loss": float(stats[0] / stats[1]), "train/lr": lr,
                  "train/acc": float(totals[2] / totals[1])}
        bar.set_postfix(loss=f"{record['train/loss']:.4f}")
        losses.append(record["train/loss"])
        if on_step is not None:
            on_step(step, record, rm)
        if checkpoint is not None and tcfg.save_every and step % tcfg.save_every == 0 and step < steps:
            save_train_state(checkpoint, accelerator, rm, optimizer, scheduler, step, losses, totals,
                             before + time.time() - t0)
    bar.close()
    rm = accelerator.unwrap_model(rm)
    accelerator.free_memory()
    summary = {"steps": step, "pairs": n - len(skip), "no_preference": len(skip), "epochs": epochs,
               "final_loss": float(np.mean(losses[-10:])),
               "train_acc": float(totals[2] / max(totals[1], 1)), "seconds": time.time() - t0,
               "seconds_before_resume": before,
               "truncated_answers": enc.truncated_answers, "truncated_prompts": enc.truncated_prompts}
    return rm, summary
