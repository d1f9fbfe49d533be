"""Configuration: dataclasses with documented defaults, YAML presets and `--section.field=value` overrides.

Every field is documented once, next to its default (the comment beside it is its `ser <command> --help` line).
Defaults describe a run that finishes on a laptop CPU.
An unknown key or a value of the wrong type is a `UserError` naming the key (and the file it came from).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import io
import math
import re
import sys
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ser.errors import UserError, shown


@dataclass
class DataConfig:
    """Where the preference pairs come from and how they are split into seed, pool and test."""

    train: str = "hh-rlhf:helpful-base"  # data spec: known name, local file or Hub dataset id
    test: str | None = None  # separate test spec; None = split the test set off `train`
    seed_size: float | int = 0.15  # human-labelled fraction (float) or count (int); SER paper: 15%
    test_size: float | int = 500  # held-out test pairs (fraction or count) when `test` is None
    pool_size: float | int | None = None  # unlabelled pool (fraction/count); None = all remaining pairs
    pool: str | None = None  # SER runs: a file of unlabelled (prompt, answer_a, answer_b) to use as the pool instead
    limit: int | None = None  # read at most this many usable pairs of each spec, duplicates then dropped (None = all)
    columns: dict | None = None  # column mapping for other files, e.g. {prompt: input, chosen: good, ...}
    split_seed: int = 0  # the seed of the hash-based split (stable under re-ordering of the input)
    drop_ties: bool = True  # drop pairs whose recorded ratings tie (UltraFeedback score_chosen == score_rejected)


@dataclass
class ModelConfig:
    """The reward model: a backbone with a scalar head (AutoModelForSequenceClassification, num_labels=1)."""

    backbone: str = "minilm"  # short name (minilm, smollm2-135m, gemma3-270m), local directory or Hub id
    mode: str = "full"  # full | lora | head | freeze  (what is trained; freeze: ser/frozen.py)
    trainable_layers: int = 2  # model.mode=freeze: top layers that train (LLaMA-Factory: freeze_trainable_layers)
    frozen_cache: str | None = None  # model.mode=freeze: directory for the frozen-layer cache; None: in memory
    max_length: int = 256  # tokens per (prompt, answer), the prompt cut from the left; `ser sft`: answer tokens
    share_prompt: bool = True  # causal RMs: one packed [prompt, a, b] sequence per pair (same rewards, fewer tokens)
    lora_r: int = 8  # LoRA rank (model.mode=lora); SER paper: r=8, alpha=32, dropout 0.1
    lora_alpha: int = 32  # LoRA scaling: the adapter's update is multiplied by alpha / r
    lora_dropout: float = 0.1  # dropout on the LoRA adapters' input
    lora_targets: list | None = None  # module names for LoRA; None = peft's default for the architecture


@dataclass
class TrainConfig:
    """The optimizer loop (reward model; `ser sft` uses it for the policy), device precision and seeds."""

    epochs: float = 1.0  # passes over the training pairs (fractional allowed)
    batch_size: int = 16  # pairs per micro-batch over all processes (each pair = 2 sequences)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5  # AdamW learning rate (SER paper used 2e-5 for 7B LoRA RMs)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_ratio: float = 0.05  # fraction of steps with linear warm-up
    schedule: str = "linear"  # linear | cosine | constant (after warm-up)
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    loss: str = "sigmoid"  # sigmoid: -log σ(r_c - r_r - margin) (Bradley–Terry) | hinge: max(0, margin - (r_c - r_r))
    margin: float = 0.0  # margin of the loss above (0 = plain Bradley–Terry)
    eval_every: int = 0  # evaluate on the test set every N steps (0 = only at the end)
    save_every: int = 100  # `ser train-rm`: a resumable checkpoint every N steps (0 = none); `--resume` continues
    seed: int = 0  # torch / shuffling seed
    score_batch_size: int = 64  # sequences per forward pass when scoring
    mixed_precision: str = "no"  # no | bf16 | fp16 | auto (bf16 where fast): training autocast; bf16 also scoring


@dataclass
class SERConfig:
    """Settings of the self-evolution loop (`ser evolve`); Huang et al., ICLR 2025 (arXiv 2411.00418), §3."""

    max_iterations: int = 3  # SER iterations after the seed RM (the paper's runs stopped after 3)
    tau_high: float = 0.55  # SER paper §3: status-1 needs one answer with σ(r) > tau_high (and the other < tau_low)
    tau_low: float = 0.45  # SER paper §3: status-1 needs the other answer with σ(r) < tau_low
    tau_delta: float = 0.30  # SER paper §3: status-2 needs |σ(r1) - σ(r2)| >= tau_delta
    min_pairs: float | int = 0.05  # N_min; int = count, float = fraction of the pool (ours; the paper: 600 of 160k)
    rule: str = "paper"  # paper: status 1 else 2, else stop | code: released OR rule | ssrm: baseline | ensemble: folds vote
    calibration: str = "temperature"  # none (paper) | center: minus the seed mean | temperature: center + fit T
    pseudo_loss: str = "sigmoid"  # loss on pseudo-labelled pairs: sigmoid (released code) | hinge (paper)
    pseudo_margin: float = 1.0  # margin of the hinge loss on pseudo-labelled pairs
    validation: float | int = 0.0  # seed pairs held out of training (fraction/count): pick + stop + calibrate; 0: paper
    patience: int = 1  # with ser.validation or ser.folds: stop after this many iterations without a validation gain
    val_metric: str = "log_likelihood"  # what validation picks/stops on: log_likelihood (calibrated BT) | accuracy
    length_guard: bool = False  # accept pseudo-labels so their longer-answer-chosen share is at most the human seed's
    restart: bool = False  # False: continue from the previous RM (paper README); True: restart from the backbone
    keep_seed: bool = True  # keep the human seed pairs in every iteration's training data
    iteration_epochs: float = 1.0  # epochs of each continuation on seed + pseudo-labels (restart: train.epochs)
    seed_epochs: float = 0.0  # > 0: the seed RM's epochs chosen on validation, from train.epochs up to this many
    ssrm_threshold: float = 0.8  # SSRM baseline: keep pairs with max(P, 1-P) >= this, P = σ((r_a - r_b) / T)
    folds: int = 0  # k >= 2 fold models cross-fitted on the seed validate; with rule=ensemble also calibrate, vote
    min_agree: int = 0  # rule=ensemble: fold models that must agree on a pair's direction (0 = all of them)
    confidence: float = 0.8  # rule=ensemble: accept where the ensemble's calibrated max(p, 1 - p) >= this
    budget: float = 0.0  # rule=ensemble: > 0 accepts this top fraction of the agreeing pairs by confidence instead
    target_precision: float = 0.0  # > 0: keep the most confident accepted pairs while their expected precision >= this
    soft_labels: bool = False  # train pseudo-labelled pairs towards the ensemble's calibrated p (soft Bradley-Terry)
    relabel: bool = False  # re-label the whole pool each iteration (earlier labels revised; voted in-sample)


@dataclass
class PolicyConfig:
    """The policy LM for `ser sft` / `ser ppo` and how it generates (released SER pipeline's sampling)."""

    backbone: str = "smollm2-135m"  # causal LM: short name, local directory (e.g. an `ser sft` output) or Hub id
    max_prompt_length: int = 256  # prompt tokens (cut from the left, keeping the latest turns)
    max_new_tokens: int = 64  # answer length limit; answers that hit it without EOS are "unfinished"
    temperature: float = 0.7  # sampling during PPO rollouts
    top_k: int = 0  # top-k filter; ppo refuses any but 0 (its log-probs need the whole distribution)
    top_p: float = 1.0  # nucleus filter; ppo refuses any but 1.0 (generate-pairs uses judge.PAIR_SAMPLING)


@dataclass
class PPOConfig:
    """`ser ppo`: PPO of the policy against a saved RM (SER paper §4: adaptive KL from 0.2)."""

    rm: str = ""  # saved RM directory (`ser train-rm`/`ser evolve` output)
    steps: int = 20  # PPO steps (one rollout batch each)
    batch_size: int = 8  # prompts per rollout, per process (N processes roll out N x this; TRL's per-device size)
    mini_batch_size: int = 4  # sequences per gradient step, per process
    ppo_epochs: int = 2  # passes over each rollout batch
    lr: float = 1e-5  # AdamW learning rate of the policy and its value head
    kl_coef: float = 0.2  # initial KL coefficient (SER paper)
    kl_target: float | None = 6.0  # adaptive control towards this KL (nats per answer); null = fixed coefficient
    kl_horizon: int = 10000  # Ziegler et al.'s horizon of the adaptive controller
    gamma: float = 1.0  # discount of the GAE advantages (1.0: none within an answer)
    lam: float = 0.95  # GAE lambda: bias (0) vs variance (1) of the advantage estimates
    clip: float = 0.2  # policy ratio clip
    clip_value: float = 0.2  # value clip
    vf_coef: float = 0.1  # weight of the value loss beside the policy loss
    reward: str = "sigmoid"  # sigmoid: sigmoid(score) - baseline (paper) | normalize: (score - mean) / std of the RM
    reward_baseline: float = 0.5  # subtracted from sigmoid(score) with reward=sigmoid
    no_eos_penalty: float = 1.0  # subtracted from the reward of answers that hit max_new_tokens without ending
    whiten_rewards: bool = False  # scale the per-token rewards of each rollout batch to unit variance (mean kept)
    save_every: int = 5  # checkpoint every N steps (and at the end)
    seed: int = 0  # torch / prompt-order / sampling seed


@dataclass
class ExperimentConfig:
    """`ser experiment` and `ser curve`: seeds, compared methods and confidence intervals."""

    seeds: list = field(default_factory=lambda: [0, 1, 2])  # one set of runs per seed (own split and train seed)
    methods: list = field(  # compared by `ser experiment` (see ser/experiment.py); seed_only always runs
        default_factory=lambda: ["seed_only", "full_label", "seed_continued", "ser_paper", "ser_code", "ssrm",
                                 "ser_ensemble"])
    bootstrap: int = 1000  # bootstrap resamples for the 95% CIs
    seed_epochs: float = 0.0  # > 0: the shared seed RM's epochs chosen on out-of-fold validation, up to this many


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ser: SERConfig = field(default_factory=SERConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


_INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")  # what int() reads as a quoted integer (not "--5" or "²", isdigit's)


def _coerce(value, tp, key: str, origin: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected. YAML 1.1 reads an
    unquoted `no` as false: for `train.mixed_precision` (whose choices include "no") false means "no"."""
    if key == "train.mixed_precision" and value is False:
        value = "no"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # Prefer the member type that matches exactly (so 500 stays an int in `float | int`), and int for a quoted
        # integer ("12" is 12 pairs, not a fraction of 12.0).
        exact = int if isinstance(value, str) and _INT_TEXT.fullmatch(value) else type(value)
        for t in sorted((a for a in args if a is not type(None)), key=lambda a: a is not exact):
            try:
                return _coerce(value, t, key, origin)
            except UserError:
                pass
        names = " or ".join("null" if a is type(None) else a.__name__ for a in args)
        raise UserError(f"{origin}: '{key}' must be {names}, got {shown(value)}")
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        except ValueError:
            number = None
        except OverflowError:  # an int beyond the float range
            number = math.inf
        if number is not None:
            if not math.isfinite(number):  # nan and inf (".nan", 1e999) are never a meaningful setting
                raise UserError(f"{origin}: '{key}' must be a finite number, got {shown(value)}")
            return number
    if tp is int and isinstance(value, str) and _INT_TEXT.fullmatch(value):
        with contextlib.suppress(ValueError):  # more digits than int() reads: refused below, the value shown
            return int(value)  # a quoted integer: YAML `seed_size: "12"`, an override --data.seed_size="12"
    if tp in (list, dict) and isinstance(value, tp):
        return value
    if isinstance(tp, type) and isinstance(value, tp) and not (isinstance(value, bool) and tp is not bool):
        return value
    raise UserError(f"{origin}: '{key}' must be {getattr(tp, '__name__', tp)}, got {shown(value)}")


def _set(cfg: Config, key: str, value, origin: str) -> None:
    section_name, _, name = key.partition(".")
    sections = {f.name for f in dataclasses.fields(Config)}
    if section_name not in sections or not name:
        raise UserError(f"{origin}: unknown config key {shown(key)} (sections: {', '.join(sorted(sections))})")
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise UserError(f"{origin}: unknown config key {shown(key)} (known in '{section_name}': {', '.join(hints)})")
    setattr(section, name, _coerce(value, hints[name], key, origin))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `section.field=value` overrides (values parsed as YAML). Raises UserError
    naming the file (and line) or "command line" and the key of a bad setting."""
    cfg, origins = Config(), {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader), path, set())
            raw = yaml.safe_load(text)
        except FileNotFoundError:
            raise UserError(f"{path}: no such config file") from None
        except IsADirectoryError:
            raise UserError(f"{path}: is a directory, expected a YAML config file") from None
        except OSError as e:  # not a directory on the way, a name too long, no permission, ...
            raise UserError(f"{path}: cannot read the config file ({e.strerror})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except ValueError:  # YAML's int() of a longer number than Python converts
            raise UserError(f"{path}: an integer of more than {sys.get_int_max_str_digits()} digits") from None
        if raw is None:  # an empty file (or comments only): most likely the wrong file
            raise UserError(f"{path}: no settings (an empty config file); leave out --config for the defaults")
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top level")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise UserError(f"{path}: section '{section}' must be a mapping, got {shown(values)}")
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value, str(path))
                origins[f"{section}.{name}"] = str(path)
    for item in overrides:
        key, eq, text = item.removeprefix("--").partition("=")
        if not eq:
            raise UserError(f"override '{item}': expected --section.field=value")
        _check_plain_number(text, f"override {shown(key)}")
        try:
            value = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError):  # not YAML, or an int YAML cannot convert: the text, checked below
            value = text
        _set(cfg, key, value, "command line")
        origins[key] = "command line"
    try:
        validate(cfg)
    except UserError as e:  # name where the offending value came from (the YAML file or the command line)
        text = str(e)
        key = next((k for k in origins if f"'{k}'" in text), None)
        if key is None or not text.startswith("config:"):
            raise
        raise UserError(origins[key] + text.removeprefix("config")) from None
    return cfg


# YAML 1.1 (PyYAML) reads a number with a leading zero as octal (0100 = 64) and one with colons as base 60
# (1:30 = 90): a seed or a count written so would change silently
_YAML11_NUMBER = re.compile(r"\s*[+-]?(0[0-7_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)\s*")


def _check_plain_number(text: str, where: str) -> None:
    """UserError for a plain scalar that YAML 1.1 reads as an octal or base-60 number, alone or as an item of a flow
    list or mapping (`[010, 011]`, `{a: 010}`); `where` names its place."""
    for item in re.split(r"[\[\]{},]|:\s", text):
        if _YAML11_NUMBER.fullmatch(item):
            raise UserError(f"{where}: {shown(item.strip())} reads as an octal or base-60 number in YAML (0100 is "
                            f"64, 1:30 is 90); write it without leading zeros or colons, or quote it")


def _check_unique_keys(node, path: Path, seen: set) -> None:
    """PyYAML keeps the last of two equal keys and drops the first silently: an error naming the line. Plain
    scalars that YAML 1.1 reads as octal or base-60 numbers are errors too (`_check_plain_number`)."""
    if id(node) in seen:  # an alias of a node already checked (and no exponential walk of alias chains)
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode) and node.style is None:
        _check_plain_number(node.value, f"{path}:{node.start_mark.line + 1}")
    if isinstance(node, yaml.MappingNode):
        keys = set()
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                if k.value in keys:
                    raise UserError(f"{path}:{k.start_mark.line + 1}: key {shown(k.value)} appears twice")
                keys.add(k.value)
            _check_unique_keys(v, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _check_unique_keys(v, path, seen)


def validate(cfg: Config) -> None:
    """Cross-field checks that the types alone cannot express."""
    choices = {
        "model.mode": (cfg.model.mode, ("full", "lora", "head", "freeze")),
        "train.schedule": (cfg.train.schedule, ("linear", "cosine", "constant")),
        "train.loss": (cfg.train.loss, ("sigmoid", "hinge")),
        "train.mixed_precision": (cfg.train.mixed_precision, ("no", "bf16", "fp16", "auto")),
        "ser.rule": (cfg.ser.rule, ("paper", "code", "ssrm", "ensemble")),
        "ser.calibration": (cfg.ser.calibration, ("none", "center", "temperature")),
        "ser.val_metric": (cfg.ser.val_metric, ("accuracy", "log_likelihood")),
        "ser.pseudo_loss": (cfg.ser.pseudo_loss, ("sigmoid", "hinge")),
        "ppo.reward": (cfg.ppo.reward, ("sigmoid", "normalize")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"config: '{key}' must be one of {', '.join(allowed)}, got {shown(value)}")
    positive = {"train.batch_size": cfg.train.batch_size, "train.grad_accum": cfg.train.grad_accum,
                "model.max_length": cfg.model.max_length, "train.score_batch_size": cfg.train.score_batch_size,
                "model.trainable_layers": cfg.model.trainable_layers,
                "ppo.batch_size": cfg.ppo.batch_size, "ppo.mini_batch_size": cfg.ppo.mini_batch_size,
                "ppo.ppo_epochs": cfg.ppo.ppo_epochs, "policy.max_new_tokens": cfg.policy.max_new_tokens,
                "ppo.save_every": cfg.ppo.save_every}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"config: '{key}' must be >= 1, got {shown(value)}")
    if cfg.ppo.mini_batch_size > cfg.ppo.batch_size:  # randperm(batch).split(mini) would make one short step
        raise UserError(f"config: 'ppo.mini_batch_size' ({cfg.ppo.mini_batch_size}) must be <= 'ppo.batch_size' "
                        f"({cfg.ppo.batch_size})")
    for loss, margin, key in ((cfg.train.loss, cfg.train.margin, "train.margin"),
                              (cfg.ser.pseudo_loss, cfg.ser.pseudo_margin, "ser.pseudo_margin")):
        # max(0, margin - d) with margin 0 is minimal (0) for an RM that scores every answer alike
        if (loss == "hinge" and not margin > 0) or not margin >= 0:
            raise UserError(f"config: '{key}' must be {'> 0 with the hinge loss' if loss == 'hinge' else '>= 0'}, "
                            f"got {shown(margin)}")
    if cfg.ppo.kl_target is not None and cfg.ppo.kl_coef == 0:  # the controller multiplies: 0 stays 0
        raise UserError("config: 'ppo.kl_coef' = 0 with 'ppo.kl_target' set: adaptive KL control cannot move a "
                        "coefficient of 0; give ppo.kl_coef > 0, or ppo.kl_target: null for no KL penalty")
    if cfg.model.max_length < 8:  # special tokens, a prompt token and an answer (`ser.models.answer_budget`)
        raise UserError(f"config: 'model.max_length' must be >= 8, got {cfg.model.max_length}")
    for key, value in {"train.save_every": cfg.train.save_every, "train.eval_every": cfg.train.eval_every}.items():
        if value < 0:
            raise UserError(f"config: '{key}' must be >= 0, got {shown(value)}")
    if not 0 <= cfg.ser.tau_low <= cfg.ser.tau_high <= 1:
        raise UserError(f"config: need 0 <= ser.tau_low <= ser.tau_high <= 1, got {cfg.ser.tau_low}, {cfg.ser.tau_high}")
    min_pairs = cfg.ser.min_pairs  # N_min = 0 would continue with zero selected pairs instead of stopping
    if not (0 < min_pairs <= 1 if isinstance(min_pairs, float) else min_pairs >= 1):
        raise UserError(f"config: 'ser.min_pairs' must be a count >= 1 or a fraction in (0, 1], got {shown(min_pairs)}")
    validation = cfg.ser.validation
    if not (0 <= validation < 1 if isinstance(validation, float) else validation >= 0):
        raise UserError(f"config: 'ser.validation' must be a count >= 0 or a fraction in [0, 1), "
                        f"got {shown(validation)}")
    s = cfg.ser
    if (s.rule == "ensemble" and s.folds < 2) or s.folds == 1 or s.folds < 0:
        raise UserError(f"config: 'ser.folds' must be 0 or >= 2, and >= 2 with 'ser.rule=ensemble' (k fold models "
                        f"vote; with a one-RM rule they validate only); got rule={s.rule}, folds={s.folds}")
    if s.folds and s.rule != "ensemble" and s.validation:
        raise UserError(f"config: 'ser.folds' with rule={s.rule} validates out of fold and 'ser.validation' on a "
                        f"hold-out: set one of them (the other's models would train for nothing)")
    if s.folds and s.rule != "ensemble" and s.restart:
        raise UserError(f"config: 'ser.folds' with rule={s.rule} needs 'ser.restart: false': each fold model labels "
                        f"the pool for its own next training with its previous iteration's weights")
    if not 0 <= s.min_agree <= max(s.folds, 0):
        raise UserError(f"config: 'ser.min_agree' must lie in [0, ser.folds = {s.folds}], got {s.min_agree}")
    if not 0.5 <= s.confidence <= 1 or not 0 <= s.budget <= 1:
        raise UserError(f"config: need 0.5 <= ser.confidence <= 1 and 0 <= ser.budget <= 1, got {s.confidence}, "
                        f"{s.budget}")
    if not (s.target_precision == 0 or 0.5 <= s.target_precision <= 1):
        raise UserError(f"config: 'ser.target_precision' must be 0 (off) or in [0.5, 1], got {s.target_precision}")
    if s.target_precision and s.rule != "ensemble" and s.calibration != "temperature":
        raise UserError(f"config: 'ser.target_precision' reads calibrated probabilities: with rule={s.rule} it needs "
                        f"ser.calibration=temperature, got {s.calibration}")
    if s.soft_labels and (s.rule != "ensemble" or s.pseudo_loss != "sigmoid"):
        raise UserError("config: 'ser.soft_labels' needs ser.rule=ensemble (its calibrated p is the target) and "
                        "ser.pseudo_loss=sigmoid")
    if s.seed_epochs and (s.seed_epochs < cfg.train.epochs or not (s.folds or s.validation)):
        raise UserError(f"config: 'ser.seed_epochs' (the most epochs the seed RM may train, chosen on validation) must "
                        f"be 0 or at least train.epochs = {cfg.train.epochs:g}, and needs a validation signal "
                        f"(ser.folds or ser.validation); got seed_epochs={s.seed_epochs:g}, folds={s.folds}, "
                        f"validation={s.validation}")
    if cfg.experiment.seed_epochs and (cfg.experiment.seed_epochs < cfg.train.epochs or cfg.ser.validation):
        raise UserError(f"config: 'experiment.seed_epochs' must be 0 or at least train.epochs = {cfg.train.epochs:g}, "
                        f"and chooses by cross-fitting (not with ser.validation); got {cfg.experiment.seed_epochs:g}, "
                        f"validation={cfg.ser.validation}")
    if cfg.ser.patience < 1:
        raise UserError(f"config: 'ser.patience' must be >= 1, got {cfg.ser.patience}")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise UserError(f"config: 'data.limit' must be >= 1 or null, got {cfg.data.limit}")
    if cfg.train.epochs <= 0 or cfg.train.lr <= 0:
        raise UserError("config: 'train.epochs' and 'train.lr' must be > 0")
    _check_ranges(cfg)


# Numeric settings and the interval each must lie in: (low, high, low included, high included); None = unbounded.
RANGES = {
    "train.weight_decay": (0, None, True, False), "train.warmup_ratio": (0, 1, True, True),
    "train.max_grad_norm": (0, None, True, False), "train.seed": (0, 2**32 - 1, True, True),
    "model.lora_r": (1, None, True, False), "model.lora_alpha": (0, None, False, False),
    "model.lora_dropout": (0, 1, True, False),
    "ser.max_iterations": (0, None, True, False), "ser.tau_delta": (0, 1, False, True),
    "ser.pseudo_margin": (0, None, True, False), "ser.iteration_epochs": (0, None, False, False),
    "ser.seed_epochs": (0, None, True, False), "ser.ssrm_threshold": (0.5, 1, True, True),
    "policy.max_prompt_length": (1, None, True, False), "policy.temperature": (0, None, False, False),
    "policy.top_k": (0, None, True, False), "policy.top_p": (0, 1, False, True),
    "ppo.steps": (1, None, True, False), "ppo.lr": (0, None, False, False), "ppo.kl_coef": (0, None, True, False),
    "ppo.kl_target": (0, None, False, False), "ppo.kl_horizon": (1, None, True, False),
    "ppo.gamma": (0, 1, True, True), "ppo.lam": (0, 1, True, True), "ppo.clip": (0, None, False, False),
    "ppo.clip_value": (0, None, False, False), "ppo.vf_coef": (0, None, True, False),
    "ppo.no_eos_penalty": (0, None, True, False), "ppo.seed": (0, 2**32 - 1, True, True),
    "experiment.bootstrap": (1, None, True, False), "experiment.seed_epochs": (0, None, True, False),
}
# What `data.columns` may map to: the fields the record formats read (ser/data.py).
COLUMN_TARGETS = ("prompt", "chosen", "rejected", "answer_a", "answer_b", "label", "score_chosen", "score_rejected")


def _check_ranges(cfg: Config) -> None:
    """Each of `RANGES` inside its interval (None is allowed where the field is optional), `data.columns`
    onto known fields, and `experiment.seeds` a non-empty list of distinct seeds. Raises UserError naming the key."""
    for key, (low, high, low_in, high_in) in RANGES.items():
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        below = low is not None and (value < low if low_in else value <= low)
        above = high is not None and (value > high if high_in else value >= high)
        if below or above:
            interval = f"{'[' if low_in else '('}{low}, {'∞' if high is None else high}{']' if high_in else ')'}"
            raise UserError(f"config: '{key}' must lie in {interval}, got {shown(value)}")
    columns = cfg.data.columns or {}
    for ours, theirs in columns.items():
        if ours not in COLUMN_TARGETS or not isinstance(theirs, str):
            # YAML reads {prompt:input} as one key 'prompt:input' without a value
            hint = ("; YAML needs a space after each colon: {prompt: input}" if theirs is None and isinstance(ours, str)
                    and ":" in ours else "")
            raise UserError(f"config: 'data.columns' maps a field ({', '.join(COLUMN_TARGETS)}) to the file's column "
                            f"name (a string); got {shown(ours)}: {shown(theirs)}{hint}")
    seeds = cfg.experiment.seeds
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in seeds):
        raise UserError(f"config: 'experiment.seeds' must be a non-empty list of integers in [0, 2**32), "
                        f"got {shown(seeds)}")
    if len(set(seeds)) < len(seeds):
        raise UserError(f"config: 'experiment.seeds' names a seed twice: {seeds}")
    methods = cfg.experiment.methods
    if not methods or not all(isinstance(m, str) for m in methods):
        raise UserError(f"config: 'experiment.methods' must be a non-empty list of method names, got {shown(methods)}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


@functools.cache
def field_help() -> dict[str, tuple[str, dict[str, str]]]:
    """{section: (its class docstring, {field: the comment beside its default})}, read from this file's source,
    so `--help` shows the documentation written above and the two cannot drift apart. A field without a
    comment maps to "" (tests/test_cli_help_report.py fails on it)."""
    source = Path(__file__).read_text(encoding="utf-8")
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    out = {}
    for section in dataclasses.fields(Config):
        node = classes[section.default_factory.__name__]
        fields = {}
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign):  # a comment on any line of a field that spans several
                fields[stmt.target.id] = next((comments[i] for i in range(stmt.lineno, stmt.end_lineno + 1)
                                               if i in comments), "")
        out[section.name] = (ast.get_docstring(node) or "", fields)
    return out
