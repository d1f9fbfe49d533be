"""`ser ppo` and `ser sft` end to end on a tiny random policy and RM (real tokenizers, real HH prompts)."""

import json

import pytest
import torch

from ser.checkpoint import save_reward_model
from ser.config import load_config
from ser.models import load_reward_model
from ser.policy import hh_messages, response_mask


def test_hh_messages_and_response_mask():
    msgs = hh_messages("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:")
    assert msgs == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "how are you?"}]
    assert hh_messages("plain question") == [{"role": "user", "content": "plain question"}]
    # eos = 9: the mask covers tokens up to and including the first eos; row 1 never ends (length limit)
    mask, ended = response_mask(torch.tensor([[5, 9, 9, 9], [5, 6, 7, 8]]), 9)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ended.tolist() == [True, False]


def _cfg(tiny_llama_dir, rm_dir, steps=2, **extra):
    o = [f"policy.backbone={tiny_llama_dir}", f"ppo.rm={rm_dir}", f"ppo.steps={steps}", "ppo.batch_size=4",
         "ppo.mini_batch_size=2", "ppo.save_every=1", "ppo.lr=1e-3", "policy.max_new_tokens=6",
         "policy.max_prompt_length=24", "data.limit=40", "data.test_size=8", "policy.temperature=1.0"]
    return load_config(None, o + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture
def tiny_rm(tiny_bert_dir, tmp_path):
    rm, tok = load_reward_model(str(tiny_bert_dir))
    return save_reward_model(rm, tok, tmp_path / "rm", {"config": {"model": {"max_length": 64}},
                                                         "reward_mean": 0.0, "reward_std": 1.0})


def test_ppo_runs_logs_changes_parameters_and_resumes(tiny_llama_dir, tiny_rm, shared_data, tmp_path, monkeypatch):
    import ser.ppo as ppo
    from ser.policy import load_policy

    run = ppo.run_ppo(_cfg(tiny_llama_dir, tiny_rm), str(tmp_path / "a"))
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("ppo/score", "ppo/kl", "ppo/entropy", "ppo/clip_frac", "ppo/value_loss", "ppo/answer_tokens"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    before, _ = load_policy(str(tiny_llama_dir))
    after, _ = load_policy(str(run / "checkpoint"))
    changed = [n for (n, p), q in zip(before.named_parameters(), after.parameters()) if not torch.equal(p, q)]
    assert changed
    # interrupted right after the step-1 checkpoint, then resumed: the same final weights and metrics
    real = ppo._checkpoint

    def crash_after_first(root, *a, **k):
        real(root, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(ppo, "_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        ppo.run_ppo(_cfg(tiny_llama_dir, tiny_rm), str(tmp_path / "b"))
    monkeypatch.setattr(ppo, "_checkpoint", real)
    ppo.run_ppo(None, None, resume=str(tmp_path / "b"))
    resumed, _ = load_policy(str(tmp_path / "b" / "checkpoint"))
    for p, q in zip(after.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q)
    rows_b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ppo/score"] for r in rows_b] == pytest.approx([r["ppo/score"] for r in rows])


def test_sft_trains_on_answers(tiny_llama_dir, shared_data, tmp_path):
    from ser.policy import load_policy, run_sft

    cfg = load_config(None, [f"policy.backbone={tiny_llama_dir}", "data.limit=24", "data.test_size=4",
                             "train.batch_size=4", "train.lr=1e-3", "model.max_length=32",
                             "policy.max_prompt_length=32"])
    summary = run_sft(cfg, str(tmp_path / "sft"))
    assert summary["steps"] == 5 and summary["pairs"] == 20
    model, tok = load_policy(str(tmp_path / "sft" / "policy"))
    assert tok.padding_side == "left" and (tmp_path / "sft" / "policy" / "manifest.json").exists()
