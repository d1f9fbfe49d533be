"""`ser ppo`: PPO of a policy LM against a saved reward model, as a plain loop of numbered steps.

The RM may use a different tokenizer from the policy (a MiniLM RM for a SmolLM2 policy): answers are decoded
to text and the RM scores (prompt, answer text) with its own tokenizer. The value function is a linear head
on the policy's last hidden state. The math (GAE, clipped losses, KL, adaptive controller) is in `ser.rl`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch
import yaml
from torch.distributed.fsdp import register_fsdp_forward_method

from ser.checkpoint import (append_jsonl, atomic_dir, check_can_write, check_resumable, check_whole, check_writable,
                            json_text, read_ser_config, refuse_existing_run, start_run, truncate_jsonl,
                            verify_manifest)
from ser.config import Config, load_config, to_dict
from ser.errors import UserError
from ser.frozen import disable_dropout
from ser.models import full_parameters
from ser.policy import generate, load_policy, plain_sampling
from ser.rl import (AdaptiveKLController, entropy_from_logits, gae, kl_estimates, masked_mean, policy_loss,
                    shape_score, token_rewards, value_loss, whiten)
from ser.scoring import score_texts

log = logging.getLogger(__name__)


class PolicyWithValue(torch.nn.Module):
    """The policy LM and its value head (a linear map of the last hidden state) as one module, so DDP,
    DeepSpeed and FSDP wrap, shard and save them together. value_head=None: the frozen reference policy."""

    def __init__(self, policy, value_head: torch.nn.Linear | None):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    @property
    def _no_split_modules(self) -> list[str]:  # FSDP's units: the policy's transformer blocks
        return self.policy._no_split_modules

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def generate(self, **kwargs):
        """Rollouts. Under FSDP this is registered as a forward method of the sharded module (its pre-forward
        gathers the weights outside the transformer blocks), so sample through here, not `self.policy`."""
        return self.policy.generate(**kwargs)

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=self.value_head is not None, use_cache=False)
        if self.value_head is None:
            return out.logits, None
        hidden = out.hidden_states[-1].to(self.value_head.weight.dtype)
        return out.logits, self.value_head(hidden)[..., 0].float()


def forward(model, prompt_ids, prompt_mask, responses, response_mask, temperature: float = 1.0,
            entropy: bool = False):
    """Log-probabilities of the response tokens under the sampling distribution (logits / temperature), the
    values before each of them (None for the reference) and, with `entropy`, the entropy (else None), all (B, T).
    model: a PolicyWithValue. The entropy is a statistic: computed without a graph (as TRL does), since keeping
    it for backward would hold two more (B, T, vocabulary) fp32 tensors."""
    ids = torch.cat([prompt_ids, responses], 1)
    attn = torch.cat([prompt_mask, response_mask.long()], 1)
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # left-padded prompts keep positions from 0
    logits, values = model(ids, attn, position_ids)
    p = prompt_ids.shape[1]
    logits = logits[:, p - 1 : -1].float() / temperature  # the position before each response token predicts it
    logp = torch.log_softmax(logits, -1).gather(-1, responses[..., None])[..., 0]
    with torch.no_grad():
        ent = entropy_from_logits(logits.detach()) if entropy else None
    return logp, None if values is None else values[:, p - 1 : -1], ent


def ppo_prompts(cfg: Config) -> list[str]:
    """Training prompts: the prompts of the seed + pool split `ser train-rm` and `ser evolve` make of the data
    (`load_splits`: data.columns, data.pool_size and data.test apply), without the test pairs' prompts."""
    from ser.pipeline import load_splits

    split = load_splits(cfg.data)
    test = {p.prompt for p in split.test}
    seen, prompts = set(), []
    for p in split.seed + split.pool:
        if p.prompt not in seen and p.prompt not in test:
            seen.add(p.prompt)
            prompts.append(p.prompt)
    if not prompts:
        raise UserError(f"ppo: no training prompts in {cfg.data.train}")
    return prompts


def run_ppo(cfg: Config | None, out: str | None, resume: str | None = None) -> Path:
    from accelerate.utils import set_seed

    from ser.pipeline import load_saved_rm
    from ser.train import compute_dtype, make_accelerator, prepare_for_training, sharded_engine

    if resume:
        root = check_resumable(resume, "ppo")
        cfg = load_config(root / "config.yaml")
        state = None
        if (root / "checkpoint").exists():
            if not (root / "checkpoint" / "ppo_state.pt").exists():
                raise UserError(f"{root}: not a `ser ppo` run directory (its checkpoint has no ppo_state.pt)")
            verify_manifest(root / "checkpoint")
            state = read_ser_config(root / "checkpoint").get("ppo_state")
            if state is None:
                raise UserError(f"{root / 'checkpoint'}: not a `ser ppo` checkpoint (no ppo_state)")
        truncate_jsonl(root / "metrics.jsonl", "step", state["step"] if state else 0)
    else:
        if not cfg.ppo.rm:
            raise UserError("ppo: set ppo.rm to a saved reward-model directory")
        refuse_existing_run(out)
        check_can_write(out)  # an output directory that cannot be written is an error before any work
        state = None
    pc, gen = cfg.ppo, cfg.policy
    if gen.top_k or gen.top_p < 1.0:
        raise UserError(f"config: ppo samples from the whole distribution (logits / policy.temperature), which its "
                        f"log-probabilities are taken under; policy.top_k = {gen.top_k} and policy.top_p = "
                        f"{gen.top_p:g} would sample from another one: set them to 0 and 1.0")
    set_seed(pc.seed)
    rm, rm_tok, rm_max_len = load_saved_rm(pc.rm)  # a bad RM fails here, before anything is written
    stats = read_ser_config(pc.rm)
    if pc.reward == "normalize" and not {"reward_mean", "reward_std"} <= set(stats):
        raise UserError(f"{pc.rm}: ppo.reward=normalize needs the RM's reward_mean/reward_std in ser_config.json "
                        f"(saved by ser train-rm / ser evolve); use ppo.reward=sigmoid for other RMs")
    if pc.reward == "normalize" and not (isinstance(stats["reward_mean"], (int, float))
                                         and isinstance(stats["reward_std"], (int, float))
                                         and math.isfinite(stats["reward_mean"])
                                         and math.isfinite(stats["reward_std"]) and stats["reward_std"] > 0):
        raise UserError(f"{pc.rm}/ser_config.json: ppo.reward=normalize needs a finite reward_mean and a finite "
                        f"reward_std > 0, got {stats['reward_mean']!r} and {stats['reward_std']!r}; use "
                        f"ppo.reward=sigmoid")
    start = 0
    if state:  # the last completed checkpoint: policy, value head, optimizer, KL coefficient
        policy, tok = load_policy(str(root / "checkpoint"))
        start = state["step"]
    else:
        policy, tok = load_policy(gen.backbone)
    if tok.eos_token_id is None:
        raise UserError(f"{gen.backbone}: the policy tokenizer has no eos token")
    if dropped := plain_sampling(policy):  # rollouts sample where the log-probabilities are taken: logits / T
        log.warning("ppo: the policy's generation_config set %s; PPO samples without them (the saved policy's "
                    "generation_config is the plain one it was trained with)", ", ".join(dropped))
    # the rollout's log-probabilities, the update's and the reference's must come from one deterministic function
    # of the weights (TRL's PPO trainer turns dropout off too; SmolLM2 and Gemma 3 have none)
    disable_dropout(policy)
    reference = copy.deepcopy(load_policy(gen.backbone)[0] if state else policy).eval().requires_grad_(False)
    reference = PolicyWithValue(reference, None)
    value_head = torch.nn.Linear(policy.config.hidden_size, 1)
    torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
    policy = PolicyWithValue(policy, value_head)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=pc.lr, weight_decay=0.0)  # TRL's PPO default (torch's: 0.01)
    kl_ctl = AdaptiveKLController(pc.kl_coef, pc.kl_target, pc.kl_horizon)
    accelerator = make_accelerator(cfg.train)  # one optimizer step per mini-batch: nothing accumulates
    engine = sharded_engine(accelerator)  # DeepSpeed / FSDP split the optimizer state across processes
    if state:
        extra = torch.load(root / "checkpoint" / "ppo_state.pt", weights_only=True)
        value_head.load_state_dict(extra["value_head"])
        if extra.get("optimizer") is not None and not engine:
            optimizer.load_state_dict(extra["optimizer"])
        else:  # the checkpoint of a DeepSpeed / FSDP run holds no optimizer state
            log.warning("ppo: resuming without the optimizer's moments (%s run)", engine or "DeepSpeed/FSDP")
        kl_ctl.value = state["kl_coef"]
    policy, optimizer = prepare_for_training(accelerator, policy, optimizer)
    register_fsdp_forward_method(accelerator.unwrap_model(policy), "generate")  # a no-op unless FSDP
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    # the reference's weights in the dtype the policy's compute in (bf16 under DeepSpeed's or FSDP's bf16), its
    # buffers (rotary frequencies) left in fp32 as the policy's are: KL 0 at the first rollout
    dtype = compute_dtype(accelerator, accelerator.unwrap_model(policy))
    reference.to(device)
    for p in reference.parameters():
        p.data = p.data.to(dtype)
    rm.to(device)
    prompts = ppo_prompts(cfg)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(pc.seed)).tolist()
    if not resume:  # everything above checked the inputs: only now does the run directory get its first file
        root = check_writable(out)
        start_run(root, "ppo", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    for step in range(start, pc.steps):
        t0 = time.time()
        first = (step * world + rank) * pc.batch_size  # each process its own prompts
        batch = [prompts[order[(first + i) % len(prompts)]] for i in range(pc.batch_size)]
        # 1. Rollout: sample an answer per prompt from the current policy.
        enc, responses, mask, ended, texts = generate(accelerator.unwrap_model(policy), tok, batch, gen,
                                                      seed=(pc.seed * 100003 + step) * 1009 + rank)
        # 2. Reward: the RM scores the decoded answer with its own tokenizer; shaped, unfinished answers penalised.
        score = torch.as_tensor(score_texts(rm, rm_tok, batch, texts, rm_max_len), dtype=torch.float32,
                                device=device)
        seq_reward = shape_score(score, pc.reward, baseline=pc.reward_baseline, mean=stats.get("reward_mean", 0.0),
                                 std=stats.get("reward_std", 1.0), ended=ended, no_eos_penalty=pc.no_eos_penalty)
        # 3. KL penalty against the frozen reference policy, per token (same precision as the policy).
        with torch.no_grad(), accelerator.autocast():
            old_logp, old_values, _ = forward(policy, enc["input_ids"], enc["attention_mask"], responses, mask,
                                              gen.temperature)
            ref_logp, _, _ = forward(reference, enc["input_ids"], enc["attention_mask"], responses, mask,
                                     gen.temperature)
        kl = torch.where(mask.bool(), kl_estimates(old_logp, ref_logp)["k1"], 0.0)
        rewards = token_rewards(seq_reward, kl, mask, kl_ctl.value)
        if pc.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        # 4. Advantages (GAE) and returns from the value head's estimates.
        advantages, returns = gae(rewards, old_values, mask, pc.gamma, pc.lam)
        advantages = whiten(advantages, mask)
        # 5. Update: several PPO epochs over mini-batches, clipped policy and value losses.
        records = []
        shuffle = torch.Generator().manual_seed(pc.seed * 100003 + step)
        for _ in range(pc.ppo_epochs):
            for idx in torch.randperm(pc.batch_size, generator=shuffle).split(pc.mini_batch_size):
                idx = idx.to(device)
                logp, values, entropy = forward(policy, enc["input_ids"][idx], enc["attention_mask"][idx],
                                                responses[idx], mask[idx], gen.temperature, entropy=True)
                pg, clip_frac = policy_loss(logp, old_logp[idx], advantages[idx], mask[idx], pc.clip)
                vf, vf_clip = value_loss(values, old_values[idx], returns[idx], mask[idx], pc.clip_value)
                loss = pg + pc.vf_coef * vf
                # every process stops together (one alone would leave the others waiting in backward's all-reduce)
                if accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).logical_not().any():
                    raise UserError(f"ppo: non-finite loss at step {step}; the last checkpoint is intact")
                accelerator.backward(loss)
                if cfg.train.max_grad_norm > 0:  # the value DeepSpeed's engine clips at (`make_accelerator`)
                    accelerator.clip_grad_norm_(policy.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                records.append((pg.item(), vf.item(), clip_frac.item(), masked_mean(entropy, mask[idx]).item()))
        # Statistics averaged over processes, so every rank updates the KL controller identically.
        local = torch.tensor([kl.sum(-1).mean().item(), score.mean().item(), seq_reward.mean().item(),
                              mask.sum(-1).mean().item(), (~ended).float().mean().item(),
                              *torch.tensor(records).mean(0).tolist()], device=device)
        seq_kl, mean_score, mean_reward, tokens, unfinished, *r = accelerator.reduce(local, "mean").tolist()
        kl_ctl.update(seq_kl, pc.batch_size * world)
        record = {"step": step + 1, "ppo/score": mean_score, "ppo/reward": mean_reward,
                  "ppo/kl": seq_kl, "ppo/kl_coef": kl_ctl.value, "ppo/entropy": r[3], "ppo/clip_frac": r[2],
                  "ppo/policy_loss": r[0], "ppo/value_loss": r[1], "ppo/answer_tokens": tokens,
                  "ppo/unfinished": unfinished, "time/seconds": time.time() - t0}
        if accelerator.is_main_process:
            append_jsonl(root / "metrics.jsonl", record)
        log.info("ppo step %d: score %.3f, reward %.3f, KL %.3f (coef %.4f), entropy %.2f, clip %.2f, %.0f tokens",
                 step + 1, record["ppo/score"], record["ppo/reward"], seq_kl, kl_ctl.value, r[3], r[2],
                 record["ppo/answer_tokens"])
        if (step + 1) % pc.save_every == 0 or step + 1 == pc.steps:
            model = accelerator.unwrap_model(policy)
            with full_parameters(model):  # whole weights under ZeRO-3 / FSDP; every process enters
                if accelerator.is_main_process:
                    _checkpoint(root, model, None if engine else optimizer.state_dict(), tok, cfg, step + 1,
                                kl_ctl.value)
            accelerator.wait_for_everyone()
    return root


def _checkpoint(root, model: PolicyWithValue, optimizer_state, tok, cfg, step, kl_coef) -> None:
    """Policy (HF directory), value head, optimizer and the loop state in one directory, renamed into place
    atomically: a run killed at any moment resumes from the last complete checkpoint."""
    check_whole(model)
    with atomic_dir(root / "checkpoint") as tmp:
        model.policy.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        torch.save({"value_head": model.value_head.state_dict(), "optimizer": optimizer_state},
                   tmp / "ppo_state.pt")
        (tmp / "ser_config.json").write_text(json_text({"config": to_dict(cfg),
                                                        "ppo_state": {"step": step, "kl_coef": kl_coef}}))
