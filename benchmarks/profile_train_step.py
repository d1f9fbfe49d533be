"""Where the time of one RM training step goes: torch.profiler over ser's training step on real HH-RLHF pairs.

    python benchmarks/profile_train_step.py --backbone smollm2-135m --batch-size 16 --steps 3

Runs `train_reward_model` (the code `ser train-rm` runs) for warm-up steps, then profiles the same loop and prints
the operators by self CPU time and the share spent in matrix multiplications: what is left to optimise once the
loop itself adds nothing.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from ser.config import TrainConfig
from ser.data import load_pairs
from ser.models import load_reward_model
from ser.train import make_accelerator, resolve_precision, train_reward_model

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_attention_math", "mkldnn::", "aten::mkldnn")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after as many warm-up steps)")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--precision", default="auto", choices=["auto", "no", "bf16"],
                   help="auto: bf16 where the hardware is fast at it, else fp32")
    args = p.parse_args()
    pairs = load_pairs("hh-rlhf:helpful-base", limit=args.batch_size * args.steps)
    data = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    tcfg = TrainConfig(batch_size=args.batch_size, epochs=1.0, lr=5e-5,
                       mixed_precision=resolve_precision(args.precision))
    rm, tok = load_reward_model(args.backbone)
    train_reward_model(rm, tok, *data, tcfg, args.max_length, accelerator=make_accelerator(tcfg))  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_reward_model(rm, tok, *data, tcfg, args.max_length, accelerator=make_accelerator(tcfg))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    print(json.dumps({"backbone": args.backbone, "batch_size": args.batch_size, "steps": args.steps,
                      "precision": tcfg.mixed_precision, "fast_bf16": resolve_precision("auto") == "bf16",
                      "threads": torch.get_num_threads(),
                      "self_cpu_seconds": total / 1e6, "matmul_and_attention_share": matmul / total}))


if __name__ == "__main__":
    main()
