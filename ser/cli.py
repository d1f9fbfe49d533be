"""The `ser` command line: one console script, a subcommand per stage, no logic of its own.

Every subcommand that trains takes `--config FILE.yaml`, dotted overrides `--section.field=value` and
`--out DIR`. Bad input (data, config, model directory) prints one line `error: ...` and exits with code 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from ser.errors import UserError, shown, shown_name

log = logging.getLogger("ser")

OVERRIDES_HELP = "dotted overrides, e.g. --train.lr=1e-5 --data.seed_size=200 (`ser COMMAND --help` lists the keys)"
# The settings each command reads: whole sections, or single keys of a section it reads only in part.
READS = {
    "train-rm": ("data", "model", "train"),
    "evolve": ("data", "model", "train", "ser"),
    "experiment": ("data", "model", "train", "ser", "experiment"),
    "curve": ("data", "model", "train", "experiment.seeds", "experiment.bootstrap"),
    "sft": ("data", "model.max_length", "policy.backbone", "policy.max_prompt_length", "train.epochs",
            "train.batch_size", "train.grad_accum", "train.lr", "train.weight_decay", "train.warmup_ratio",
            "train.max_grad_norm", "train.seed", "train.mixed_precision"),
    "ppo": ("data", "policy", "ppo", "train.mixed_precision", "train.max_grad_norm"),  # data: ppo_prompts' split
}


def _split_overrides(extra: list[str]) -> list[str]:
    """['--a.b=1', '--c.d', '2'] -> ['a.b=1', 'c.d=2']; anything else is an error naming the argument."""
    out, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise UserError(f"unrecognised argument '{arg}' (overrides look like --section.field=value)")
        if "=" in arg:
            out.append(arg[2:])
            i += 1
        elif i + 1 < len(extra):
            out.append(f"{arg[2:]}={extra[i + 1]}")
            i += 2
        else:
            raise UserError(f"override '{arg}' has no value")
    return out


def _config_unless_resume(args, extra: list[str]):
    """The config from --config and overrides; None with --resume (the run continues with its saved config)."""
    from ser.config import load_config

    if args.resume and (args.config or extra):
        raise UserError("--resume continues a run with its saved config; drop --config and overrides")
    if args.resume and getattr(args, "out", None):
        raise UserError("--resume continues a run in its own directory; drop --out")
    return None if args.resume else load_config(args.config, _split_overrides(extra))


def _seed(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**32) as train.seed (torch.manual_seed overflows past 2**64, and
    the judge adds to it); argparse's own `int` would print a 5,000-digit value whole."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {shown(text)}")
    return n


def _count(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size, a number of pairs or tokens)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {shown(text)}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {shown(n)}")
    return n


def _margin(text: str) -> float:
    """argparse type: a finite number >= 0 (a reward margin)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {shown(text)}") from None
    if not (x >= 0 and x != float("inf")):
        shown_text = text if len(text) <= 60 else shown(text)  # a number as typed; a 5,000-digit one cut
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {shown_text}")
    return x


def _yaml_value(value) -> str:
    """A default as it is written in a YAML preset or an override (quoted where YAML would read another type:
    `no` is false in YAML, `'no'` the string)."""
    import yaml

    if isinstance(value, str) and value and yaml.safe_load(value) == value:
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def settings_help(command: str) -> str:
    """The settings `command` reads, by section: key, type, default and the comment beside it in ser/config.py."""
    import dataclasses

    from ser.config import Config, field_help

    reads, defaults, docs = READS[command], Config(), field_help()
    lines = ["settings, set in the --config YAML or as --section.field=VALUE (e.g. --train.lr=1e-5); the default "
             "after '=':"]
    for section in dict.fromkeys(r.partition(".")[0] for r in reads):
        doc, comments = docs[section]
        fields = {f.name: f.type for f in dataclasses.fields(getattr(defaults, section))}
        names = list(fields) if section in reads else [r.partition(".")[2] for r in reads
                                                       if r.startswith(f"{section}.")]
        lines += ["", f"{section}{'' if section in reads else ' (only these keys)'}: {doc}"]
        for name in names:
            lines += [f"  {section}.{name}: {fields[name]} = {_yaml_value(getattr(getattr(defaults, section), name))}",
                      f"      {comments[name]}"]
    return "\n".join(lines)


def _config_parser(sub, command: str, help: str) -> argparse.ArgumentParser:
    """The subparser of a command that takes a config; its --help lists every setting it reads."""
    return sub.add_parser(command, help=help, epilog=settings_help(command),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_config_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--config", help="YAML preset (configs/*.yaml); overrides follow as --section.field=value")
    p.add_argument("--out", required=out_required, help="output directory (printed at the end)")


COLUMNS_HELP = ("the file's column names, as data.columns in a config: e.g. '{prompt: input, answer_a: output_1, "
                "answer_b: output_2, label: label}' (quoted, a space after each colon)")


def _columns(value: str | None) -> dict | None:
    """--data.columns of `ser score`/`ser eval`, checked as the config's data.columns is."""
    from ser.config import load_config

    return None if value is None else load_config(None, [f"data.columns={value}"]).data.columns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ser", description="Self-Evolved Reward Learning: reward models from "
                                     "few human labels (Huang et al., ICLR 2025).", epilog=OVERRIDES_HELP)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the libraries' own warnings and progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _config_parser(sub, "train-rm", "train a reward model on human-labelled pairs")
    _add_config_args(p, out_required=False)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")

    p = sub.add_parser("score", help="score both answers of every pair with a saved reward model")
    p.add_argument("--rm", required=True, help="saved reward-model directory")
    p.add_argument("--data", required=True, help="data spec: hh-rlhf:helpful-base, a file, or a Hub id")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--limit", type=_count, help="score only the first N pairs")
    p.add_argument("--batch-size", type=_count, default=64, help="sequences per forward pass (a pair is two)")
    p.add_argument("--data.columns", dest="columns", metavar="MAPPING", help=COLUMNS_HELP)

    p = sub.add_parser("eval", help="accuracy, margin and calibration of a saved reward model")
    p.add_argument("--rm", required=True, help="saved reward-model directory")
    p.add_argument("--data", required=True, help="data spec: hh-rlhf:helpful-base, a file, or a Hub id")
    p.add_argument("--limit", type=_count, help="evaluate only the first N pairs")
    p.add_argument("--batch-size", type=_count, default=64, help="sequences per forward pass (a pair is two)")
    p.add_argument("--data.columns", dest="columns", metavar="MAPPING", help=COLUMNS_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _config_parser(sub, "evolve", "the SER loop: seed RM, then self-labelling iterations")
    _add_config_args(p, out_required=False)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run after its last completed iteration")

    p = _config_parser(sub, "experiment", "SER vs baselines over several seeds, with a report")
    _add_config_args(p)

    p = _config_parser(sub, "sft", "supervised fine-tuning of a policy LM on the chosen answers")
    _add_config_args(p)

    p = _config_parser(sub, "ppo", "PPO of a policy LM against a saved reward model")
    _add_config_args(p, out_required=False)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")

    p = sub.add_parser("generate-pairs", help="an unlabelled pool: two answers per prompt from one or two policies")
    p.add_argument("--policy", required=True, help="policy directory (or backbone name) for answer_a")
    p.add_argument("--policy-b", help="policy for answer_b (default: a second sample of --policy)")
    p.add_argument("--prompts", required=True, help="data spec (labelled or not) whose prompts are used")
    p.add_argument("--out", required=True, help="output .jsonl (prompt, answer_a, answer_b)")
    p.add_argument("--limit", type=_count, help="first N unique prompts")
    p.add_argument("--max-new-tokens", type=_count, default=128)
    p.add_argument("--seed", type=_seed, default=0)

    p = sub.add_parser("judge", help="win / tie / lose of policy A against B, judged by a gold RM")
    p.add_argument("--a", required=True, help="policy A directory (or backbone name)")
    p.add_argument("--b", required=True, help="policy B directory (or backbone name)")
    p.add_argument("--prompts", required=True, help="data spec (labelled or not) of held-out prompts")
    p.add_argument("--judge", required=True, help="saved RM directory used as the judge")
    p.add_argument("--out", required=True, help="output .jsonl with both answers, scores and verdicts")
    p.add_argument("--limit", type=_count, help="first N unique prompts")
    p.add_argument("--tie-margin", type=_margin, default=0.0, help="|r_a - r_b| <= margin counts as a tie")
    p.add_argument("--llm-url", help="also judge with an LLM behind an OpenAI-compatible endpoint (e.g. "
                   "http://localhost:8000/v1); the API key is read from $OPENAI_API_KEY")
    p.add_argument("--llm-model", help="model name for --llm-url")
    p.add_argument("--max-new-tokens", type=_count, default=128)
    p.add_argument("--seed", type=_seed, default=0)

    p = _config_parser(sub, "curve", "learning curve: RM test accuracy vs number of human labels, with CIs")
    _add_config_args(p)
    p.add_argument("--sizes", required=True,
                   help="comma-separated label counts, fractions of all pairs, or 'all', e.g. 100,0.15,all")
    p.add_argument("--modes", help="compare training modes side by side on the same splits, e.g. "
                   "full,lora,freeze:1,freeze:2 (freeze:N: the top N layers train); default: model.mode")
    return parser


def _print_eval(m: dict) -> None:
    print(f"reward model: {m['rm']}\ndata: {m['data']} ({m['n']} pairs)")
    print(f"accuracy: {m['accuracy']:.4f}  (a pair counts as correct only if r_chosen > r_rejected strictly; "
          f"ties: {m['ties']})")
    print(f"mean margin: {m['mean_margin']:.4f}   ECE: {m['ece']:.4f}   Brier: {m['brier']:.4f}")
    if m.get("non_finite"):
        n = m["non_finite"]
        print(f"left out: {n} pair{'s' * (n != 1)} with a non-finite reward (NaN or inf), record{'s' * (n != 1)} "
              f"{', '.join(map(str, m['non_finite_records']))}")
    for source, acc in m.get("accuracy_by_source", {}).items():
        print(f"  {source}: {acc:.4f}")


class _LevelFloor(logging.Filter):
    """Passes records at `level` and above: a floor that holds when a library resets its logger's level."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def setup_logging(verbose: bool, follower: bool = False) -> None:
    """ser's own log (INFO; DEBUG with -v) on stderr, and the libraries' routine notices only with -v.

    Hidden by default, shown with -v: transformers' load report (the reward head is new by design, so its
    weights are always MISSING from a backbone), its per-load "Loading weights" / "Writing model shards" bars,
    and DeepSpeed's "Setting accelerator to CPU" (accelerate imports DeepSpeed to unwrap a model, also in runs
    that do not use it). Errors always show; ser's own progress bars show on a terminal only."""
    import transformers.utils.logging as hf_logging

    logging.basicConfig(level=logging.WARNING if follower else logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("accelerate", "peft", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    hf_logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)  # its own handler, not the root's
    hf_logging.enable_progress_bar() if verbose else hf_logging.disable_progress_bar()  # and huggingface_hub's
    # "sequence longer than the maximum" is expected: ser tokenizes first, then truncates the prompt itself.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    # DeepSpeed sets its logger's level when it is imported (later, inside accelerate): a filter outlives that.
    # In a DeepSpeed launch its warnings are about the run, and stay.
    deepspeed = logging.getLogger("DeepSpeed")
    for f in [f for f in deepspeed.filters if isinstance(f, _LevelFloor)]:
        deepspeed.removeFilter(f)
    if not verbose and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        deepspeed.addFilter(_LevelFloor(logging.ERROR))


def run(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    follower = int(os.environ.get("RANK", "0")) > 0  # under torchrun/accelerate launch: only rank 0 reports
    if follower:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    setup_logging(args.verbose, follower)
    from ser.config import load_config

    if args.command in ("score", "eval", "generate-pairs", "judge") and extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    if "SER_FROZEN_CACHE_GIB" in os.environ:  # checked before any output is written, not at the first freeze RM
        from ser.frozen import memory_cap_gib

        memory_cap_gib()
    if args.command == "train-rm":
        from ser.pipeline import run_train_rm

        cfg = _config_unless_resume(args, extra)
        result = run_train_rm(cfg, args.out, resume=args.resume)
        left_out = result.get("no_preference", 0)
        print(f"test accuracy: {result['test/accuracy']:.4f} on {result['test/n']} pairs "
              f"(strict r_chosen > r_rejected); trained on {result['train_pairs'] - left_out} pairs"
              + (f" ({left_out} of {result['train_pairs']} left out: identical after tokenization)" if left_out else "")
              + f" in {result['train_seconds']:.0f}s")
        print(f"wrote {args.resume or args.out}")
    elif args.command == "score":
        from ser.pipeline import run_score

        r = run_score(args.rm, args.data, args.out, args.limit, args.batch_size,
                      columns=_columns(args.columns))
        skipped = sum(r["skipped"].values())
        print(f"scored {r['scored']} pair{'s' if r['scored'] != 1 else ''}; "
              f"skipped {skipped} record{'s' if skipped != 1 else ''}"
              + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(r['skipped'].items()))})" if skipped else ""))
        print(f"wrote {args.out} and {r['skipped_file']} (the records skipped, with the reason)")
    elif args.command == "eval":
        from ser.checkpoint import json_text
        from ser.pipeline import run_eval

        m = run_eval(args.rm, args.data, args.limit, args.batch_size, columns=_columns(args.columns))
        print(json_text(m, sort_keys=True)) if args.json else _print_eval(m)
    elif args.command == "evolve":
        from ser.evolve import run_evolve, summary_table

        cfg = _config_unless_resume(args, extra)
        out = run_evolve(cfg, args.out, resume=args.resume)
        print(summary_table(out))
        print(f"wrote {out}")
    elif args.command == "experiment":
        from ser.experiment import run_experiment

        cfg = load_config(args.config, _split_overrides(extra))
        out = run_experiment(cfg, args.out)
        print(f"wrote {out}")
    elif args.command == "sft":
        from ser.policy import run_sft

        summary = run_sft(load_config(args.config, _split_overrides(extra)), args.out)
        print(f"sft: {summary['steps']} steps on {summary['pairs']} answers, final loss {summary['final_loss']:.4f}")
        print(f"wrote {args.out}/policy")
    elif args.command == "ppo":
        from ser.ppo import run_ppo

        cfg = _config_unless_resume(args, extra)
        if not args.resume and not args.out:
            raise UserError("ppo: give --out DIR (or --resume RUN_DIR)")
        print(f"wrote {run_ppo(cfg, args.out, resume=args.resume)}")
    elif args.command == "generate-pairs":
        from ser.judge import generate_pairs

        n = generate_pairs(args.policy, args.policy_b, args.prompts, args.out, limit=args.limit,
                           max_new_tokens=args.max_new_tokens, seed=args.seed)
        print(f"generated {n} pairs\nwrote {args.out}")
    elif args.command == "judge":
        from ser.judge import judge

        if bool(args.llm_url) != bool(args.llm_model):
            raise UserError("judge: --llm-url and --llm-model go together")
        llm = {"url": args.llm_url, "model": args.llm_model, "api_key": os.environ.get("OPENAI_API_KEY")} \
            if args.llm_url else None
        v = judge(args.a, args.b, args.prompts, args.judge, args.out, limit=args.limit, tie_margin=args.tie_margin,
                  max_new_tokens=args.max_new_tokens, seed=args.seed, llm=llm)
        print(f"A vs B on {v.n} prompts (judge {args.judge}, tie margin {args.tie_margin}):")
        for k in ("win", "tie", "lose"):
            lo, hi = v.ci95[k]
            print(f"  {k:4s} {getattr(v, k):.3f}  95% CI [{lo:.3f}, {hi:.3f}]")
        print(f"  mean judge score: A {v.mean_score_a:.4f}, B {v.mean_score_b:.4f}; A - B "
              f"{v.mean_score_a - v.mean_score_b:+.4f}, 95% CI [{v.mean_diff_ci95[0]:+.4f}, {v.mean_diff_ci95[1]:+.4f}]"
              f"\nwrote {args.out}")
        if v.llm:
            print(f"  LLM judge {v.llm['model']}: " + ", ".join(
                f"{k} {v.llm[k]:.3f} [{v.llm['ci95'][k][0]:.3f}, {v.llm['ci95'][k][1]:.3f}]" for k in ("win", "tie", "lose")))
    elif args.command == "curve":
        from ser.experiment import run_curve

        cfg = load_config(args.config, _split_overrides(extra))
        modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else None
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        if not sizes or modes == []:
            raise UserError(f"curve: --sizes {args.sizes!r}{f' / --modes {args.modes!r}' if modes == [] else ''} "
                            f"names nothing to train (e.g. --sizes 100,0.15,all)")
        out = run_curve(cfg, args.out, sizes, modes)
        print((out / "curve.md").read_text())
        print(f"wrote {out}")
    return 0


def close_process_group() -> None:
    """Destroy the default `torch.distributed` process group, if this process joined one (`torchrun`,
    `accelerate launch`). A process that exits with it alive leaves gloo's worker threads holding work whose
    release during interpreter teardown can abort it (SIGABRT, "terminate called without an active exception",
    after every result was written: seen once in 25 CI runs; the cause as described in pytorch/pytorch PR #179291).
    Called only after a command succeeded: under gloo destroying is local to this process, but NCCL's shutdown may
    wait on a rank still inside a collective. A failure here is logged, never turned into a failed run."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group to close
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 (the command's results are written; this is teardown)
        log.warning("could not destroy the process group at exit: %s", e)


def _resume_hint(argv: list[str]) -> str:
    """How to go on after Ctrl-C, for the commands that checkpoint: '' for the others."""
    command = next((a for a in argv if not a.startswith("-")), None)
    run = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--out", "--resume")), None)
    run = run or next((a.split("=", 1)[1] for a in argv if a.startswith(("--out=", "--resume="))), None)
    if command in ("train-rm", "evolve", "ppo") and run and os.path.isdir(run):
        return f"; completed checkpoints are kept: ser {command} --resume {run}"
    if command in ("experiment", "curve"):
        return "; the same command again goes on from the finished runs"
    return ""


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = run(sys.argv[1:])
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        code = 2
    except OSError as e:
        # a file-system error on a path (no space, no permission, a name too long, a file where a directory is
        # expected, ...): one line naming the path. Anything else is a fault of ser's: its traceback is kept
        if e.filename is None and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every write is atomic: what was completed before this write is intact, nothing is half-written.
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        print(f"error: {shown_name(str(e.filename or 'output'), 200)}: {e.strerror}"
              + ("; completed checkpoints are intact (free space, then --resume where the command has it)"
                 if full else ""), file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted" + _resume_hint(sys.argv[1:]), file=sys.stderr)
        code = 130
    if code == 0:
        close_process_group()
    sys.exit(code)
