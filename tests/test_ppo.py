"""`ser ppo` and `ser sft` end to end on a tiny random policy and RM (real tokenizers, real HH prompts)."""

import json

import numpy as np
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


def test_policy_prompts_keep_the_bos_a_tokenizer_adds(tiny_llama_dir, tiny_llama_bos_dir):
    """Generation and SFT see prompt ids cut from the left with the tokenizer's bos (Llama, Mistral, Gemma) kept
    first, never doubled when a chat template wrote it into the text; SmolLM2's tokenizer adds none."""
    from ser.models import load_tokenizer
    from ser.policy import encode_prompts, prompt_ids

    plain, bos = load_tokenizer(str(tiny_llama_dir)), load_tokenizer(str(tiny_llama_bos_dir))
    text = "Human: " + "tell me more " * 20 + "\n\nAssistant:"
    bare = plain(text, add_special_tokens=False)["input_ids"]
    assert prompt_ids(plain, text, 1000) == bare and prompt_ids(plain, text, 10) == bare[-10:]
    b = bos.bos_token_id
    assert prompt_ids(bos, text, 1000) == [b] + bare and prompt_ids(bos, text, 10) == [b] + bare[-9:]
    assert prompt_ids(bos, bos.bos_token + text, 1000) == [b] + bare  # the template's own bos: not a second one
    plain.pad_token, plain.chat_template = plain.eos_token, None
    enc = encode_prompts(plain, ["Human: hi\n\nAssistant:", text], 12)  # no chat template: the raw text
    short = plain("Human: hi\n\nAssistant:", add_special_tokens=False)["input_ids"]
    assert enc["input_ids"].shape == (2, 12) and enc["input_ids"][1].tolist() == bare[-12:]
    assert enc["input_ids"][0, 12 - len(short):].tolist() == short and enc["attention_mask"][0].sum() == len(short)


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


def test_ppo_refuses_filtered_sampling_before_any_write(tiny_llama_dir, tmp_path):
    """PPO's log-probabilities are taken under logits / temperature: top-k or top-p sampling would make every
    ratio and KL off-policy, so it is refused (ser generate-pairs still samples with them)."""
    from ser.errors import UserError
    from ser.ppo import run_ppo

    for extra in ({"policy.top_k": 5}, {"policy.top_p": 0.9}):
        with pytest.raises(UserError, match="policy.top_k = .* and policy.top_p = .*: set them to 0 and 1.0"):
            run_ppo(_cfg(tiny_llama_dir, tmp_path / "no-rm", **extra), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mean, std", [(0.0, 0.0), (float("nan"), 1.0), (0.0, None)])
def test_ppo_normalize_refuses_unusable_reward_statistics_before_any_write(tiny_llama_dir, tiny_bert_dir, tmp_path,
                                                                         mean, std):
    """ppo.reward=normalize divides by the RM's reward_std: 0 would scale rewards by 1e8, a NaN (stored as null
    when every training reward was non-finite) would crash mid-run."""
    from ser.errors import UserError
    from ser.ppo import run_ppo

    rm, tok = load_reward_model(str(tiny_bert_dir))
    rm_dir = save_reward_model(rm, tok, tmp_path / "rm", {"config": {"model": {"max_length": 64}},
                                                          "reward_mean": mean, "reward_std": std})
    with pytest.raises(UserError, match="needs a finite reward_mean and a finite reward_std > 0"):
        run_ppo(_cfg(tiny_llama_dir, rm_dir, **{"ppo.reward": "normalize"}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_rollouts_ignore_sampling_settings_the_checkpoint_ships(tiny_llama_dir):
    """transformers fills what a generate call leaves unset from model.generation_config: a checkpoint's
    repetition_penalty / suppress_tokens would change the rollout distribution under PPO's log-probs.
    plain_sampling drops them (and says which); rollouts then equal those of a policy that never had them."""
    from ser.config import PolicyConfig
    from ser.policy import generate, load_policy, plain_sampling

    pcfg = PolicyConfig(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0)
    plain, tok = load_policy(str(tiny_llama_dir))
    shipped, _ = load_policy(str(tiny_llama_dir))
    prompts = ["Hello there", "How do I bake bread?"]
    want = generate(plain, tok, prompts, pcfg, seed=3)[1]
    first = sorted(set(want[:, 0].tolist()))  # the tokens sampled first: suppressed, they cannot be
    shipped.generation_config.repetition_penalty, shipped.generation_config.suppress_tokens = 5.0, first
    assert not torch.equal(generate(shipped, tok, prompts, pcfg, seed=3)[1], want)  # the settings did act
    assert plain_sampling(shipped) == ["repetition_penalty=5.0", f"suppress_tokens={first!r}"]
    assert torch.equal(generate(shipped, tok, prompts, pcfg, seed=3)[1], want)
    assert shipped.generation_config.eos_token_id == tok.eos_token_id and plain_sampling(shipped) == []


def test_the_update_keeps_no_graph_for_the_entropy(tiny_llama_dir):
    """The entropy is logged, never differentiated: computed without a graph (two (B, T, vocabulary) fp32 tensors
    fewer held for backward), and only where asked for (the rollout's and the reference's passes do not)."""
    from ser.policy import load_policy
    from ser.ppo import PolicyWithValue, forward

    policy = PolicyWithValue(load_policy(str(tiny_llama_dir))[0], torch.nn.Linear(32, 1))
    prompt, responses = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])
    args = (policy, prompt, torch.ones_like(prompt), responses, torch.ones_like(responses))
    logp, values, entropy = forward(*args, entropy=True)
    assert logp.requires_grad and values.requires_grad and entropy.grad_fn is None and entropy.shape == (1, 2)
    assert forward(*args)[2] is None


def test_disable_dropout_makes_a_training_mode_forward_deterministic():
    """Rollout and update log-probabilities must be one function of the weights (the policy is in train mode
    between rollouts): nn.Dropout's p and a Llama attention's float attention_dropout go to 0."""
    from ser.frozen import disable_dropout

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)).train()
    net[0].attention_dropout = 0.1  # stands in for LlamaAttention's attribute
    x = torch.randn(4, 8)
    assert not torch.equal(net(x), net(x))
    disable_dropout(net)
    assert net.training and torch.equal(net(x), net(x)) and net[0].attention_dropout == 0.0


def test_ppo_prompts_come_from_the_split_the_rm_commands_make(tmp_path):
    """data.test (and data.columns, data.pool_size) apply as in `ser train-rm`: a test prompt is never trained on."""
    from ser.ppo import ppo_prompts

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"q": f"q{i}", "good": f"good {i}", "bad": f"bad {i}"}) + "\n"
                             for i in range(12)))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"q": f"q{i}", "good": f"other {i}", "bad": "no"}) + "\n" for i in (0, 1)))
    cfg = load_config(None, [f"data.train={train}", f"data.test={test}", "data.seed_size=4",
                             "data.columns={prompt: q, chosen: good, rejected: bad}"])
    assert sorted(ppo_prompts(cfg), key=lambda q: int(q[1:])) == [f"q{i}" for i in range(2, 12)]


def test_sft_ends_whole_answers_only():
    from ser.policy import sft_target

    assert sft_target([4, 5], 9, 3) == [4, 5, 9]  # fits with its eos
    assert sft_target([4, 5, 6], 9, 3) == [4, 5, 6]  # exactly max_length: no room for eos, none added
    assert sft_target([4, 5, 6, 7], 9, 3) == [4, 5, 6]  # cut: no eos mid-sentence (it was [4, 5, 9])
    assert sft_target([], 9, 3) == [9]


def test_sft_trains_on_answers(tiny_llama_dir, shared_data, tmp_path):
    from ser.errors import UserError
    from ser.policy import load_policy, run_sft

    cfg = load_config(None, [f"policy.backbone={tiny_llama_dir}", "data.limit=24", "data.test_size=4",
                             "train.batch_size=4", "train.lr=1e-3", "model.max_length=32",
                             "policy.max_prompt_length=32"])
    summary = run_sft(cfg, str(tmp_path / "sft"))
    assert summary["steps"] == 5 and summary["pairs"] == 20
    model, tok = load_policy(str(tmp_path / "sft" / "policy"))
    assert tok.padding_side == "left" and (tmp_path / "sft" / "policy" / "manifest.json").exists()
    with pytest.raises(UserError, match="already holds a run; a `ser sft` run cannot be resumed, or give another"):
        run_sft(cfg, str(tmp_path / "sft"))  # a second run into the same --out would mix its metrics in


def test_sft_gradient_accumulation_weighs_every_answer_token_of_a_step_alike(tiny_llama_dir, shared_data, tmp_path,
                                                                            monkeypatch):
    """20 answers as one batch, or as micro-batches of 3, 3, 3, 3, 3, 3, 2 accumulated into one optimizer step
    (grad_accum=7), give the same step: the loss is the mean over all the step's answer tokens, not the mean of the
    micro-batches' means. Plain SGD stands in for AdamW so that the weights compare the gradients themselves."""
    from ser.policy import load_policy, run_sft

    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    weights = []
    for batch_size, accum in ((20, 1), (3, 7)):
        cfg = load_config(None, [f"policy.backbone={tiny_llama_dir}", "data.limit=24", "data.test_size=4",
                                 f"train.batch_size={batch_size}", f"train.grad_accum={accum}", "train.lr=1.0",
                                 "train.warmup_ratio=0", "model.max_length=32", "policy.max_prompt_length=32"])
        summary = run_sft(cfg, str(tmp_path / f"sft{accum}"))
        assert summary["steps"] == 1 and summary["pairs"] == 20
        model, _ = load_policy(str(tmp_path / f"sft{accum}" / "policy"))
        weights.append({n: q.detach().clone() for n, q in model.named_parameters()})
    for n in weights[0]:
        torch.testing.assert_close(weights[1][n], weights[0][n], atol=1e-5, rtol=1e-4)


def test_verdicts_hand_derived():
    from ser.judge import verdicts

    v = verdicts([1.0, 0.0, 0.05, -1.0], [0.0, 1.0, 0.0, -1.0], tie_margin=0.1, n_resamples=200)
    # differences 1, -1, 0.05, 0: one win, one loss, two ties
    assert (v.win, v.tie, v.lose) == (0.25, 0.5, 0.25) and v.n == 4
    assert v.ci95["tie"][0] <= 0.5 <= v.ci95["tie"][1]
    # mean difference 0.05 / 4 = 0.0125; resampled means of {1, -1, 0.05, 0} lie within [-1, 1]
    assert v.mean_score_a - v.mean_score_b == pytest.approx(0.0125)
    assert -1 <= v.mean_diff_ci95[0] <= 0.0125 <= v.mean_diff_ci95[1] <= 1
    # a non-finite score leaves its prompt out (not a tie): the same four prompts plus one NaN, one inf
    w = verdicts([1.0, 0.0, 0.05, -1.0, float("nan"), 2.0], [0.0, 1.0, 0.0, -1.0, 0.0, float("inf")], tie_margin=0.1,
                 n_resamples=200)
    assert (w.win, w.tie, w.lose, w.n, w.excluded) == (0.25, 0.5, 0.25, 4, 2)
    assert w.mean_score_a - w.mean_score_b == pytest.approx(0.0125)
    with pytest.raises(ValueError, match="no prompt of 1 has finite scores"):
        verdicts([float("nan")], [0.0], tie_margin=0.1)


def test_judge_and_generate_pairs_check_every_input_before_generating(tiny_llama_dir, tiny_rm, shared_data,
                                                                      tmp_path, monkeypatch):
    """A typo in --b or --judge fails before the first answer is generated (it surfaced after all of A's)."""
    import ser.judge
    from ser.errors import UserError
    from ser.judge import generate_pairs, judge

    monkeypatch.setattr(ser.judge, "_answers", lambda *a, **k: pytest.fail("generated before checking"))
    out = str(tmp_path / "verdicts.jsonl")
    with pytest.raises(UserError, match="no such reward-model directory"):
        judge(str(tiny_llama_dir), str(tiny_llama_dir), "hh-rlhf:helpful-base", str(tmp_path / "nope"), out, limit=2)
    with pytest.raises(UserError, match="no_such_policy"):
        judge(str(tiny_llama_dir), "no_such_policy", "hh-rlhf:helpful-base", str(tiny_rm), out, limit=2)
    with pytest.raises(UserError, match="no_such_policy"):
        generate_pairs(str(tiny_llama_dir), "no_such_policy", "hh-rlhf:helpful-base", str(tmp_path / "p.jsonl"))
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".jsonl"]


def test_generate_pairs_feeds_evolve_and_judge_writes_verdicts(tiny_llama_dir, tiny_rm, shared_data, tmp_path,
                                                               caplog):
    from ser.data import load_unlabelled
    from ser.judge import generate_pairs, judge, load_prompts

    pool = tmp_path / "pool.jsonl"
    assert generate_pairs(str(tiny_llama_dir), None, "hh-rlhf:helpful-base", str(pool), limit=6,
                          max_new_tokens=5) == 6
    rows = [json.loads(l) for l in pool.read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "answer_a", "answer_b"}
    assert len(load_unlabelled(str(pool))) == sum(r["answer_a"] != r["answer_b"] for r in rows)
    # an unlabelled file (this one) gives prompts to judge on too
    usable = [r["prompt"] for r in rows if r["answer_a"] != r["answer_b"] and r["answer_a"].strip()
              and r["answer_b"].strip()]
    assert load_prompts(str(pool), None) == list(dict.fromkeys(usable)) != []
    v = judge(str(tiny_llama_dir), str(tiny_llama_dir), "hh-rlhf:helpful-base", str(tiny_rm),
              str(tmp_path / "verdicts.jsonl"), limit=5, max_new_tokens=5)
    # the same policy with the same seed gives the same answers: every prompt is a tie
    assert (v.win, v.tie, v.lose) == (0.0, 1.0, 0.0)
    assert ("5 of 5 prompts got the same answer from both policies: each is a tie (policies A and B are the "
            "same checkpoint, sampled with the same seed)") in caplog.text
    lines = [json.loads(l) for l in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(l["verdict"] == "tie" and l["score_a"] == l["score_b"] for l in lines)


def test_saved_rm_is_a_reward_function_for_trl_grpo(tiny_llama_dir, tiny_rm, tmp_path):
    """TRL's GRPOTrainer takes the saved RM directory as `reward_funcs` (its own BERT tokenizer, a Llama
    policy) and runs an optimizer step on CPU."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from ser.policy import load_policy

    policy, tok = load_policy(str(tiny_llama_dir))
    before = [p.detach().clone() for p in policy.parameters()]
    data = Dataset.from_dict({"prompt": ["Human: hi\n\nAssistant:", "Human: what is 2+2?\n\nAssistant:"] * 2})
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, max_steps=1, learning_rate=1e-2, report_to=[], save_strategy="no",
                      logging_steps=1, use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0)
    trainer = GRPOTrainer(model=policy, reward_funcs=str(tiny_rm), args=args, train_dataset=data,
                          processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 1
    assert any("reward" in k for k in trainer.state.log_history[0])
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))


def test_llm_judge_replies_are_parsed_or_left_out():
    from ser.judge import parse_choice

    replies = {"A": "A", "B.": "B", "(A)": "A", "**B**": "B", "Response A": "A", "A,": "A", "Tie": "tie",
               "tie.": "tie", "'B'": "B", "A tie": None, "A or B": None, "I cannot tell": None, "": None,
               "a": None, "Both": None}
    assert {r: parse_choice(r) for r in replies} == replies


def test_llm_judge_asks_both_orders_over_the_openai_protocol():
    """A local OpenAI-compatible endpoint (no LLM is reachable here) that prefers the response containing "good":
    both orders agree -> a vote; an endpoint that always says "A" (pure position bias) -> only ties."""
    import http.server
    import threading

    from ser.errors import UserError
    from ser.judge import llm_votes

    class Endpoint(http.server.BaseHTTPRequestHandler):
        biased = False

        def do_POST(self):
            assert self.path == "/v1/chat/completions"
            text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
            a, b = text.split("Response A:\n")[1].split("\n\nResponse B:\n")
            reply = "A" if self.biased else ("tie" if ("good" in a) == ("good" in b) else "A" if "good" in a else "B.")
            reply = "I cannot tell" if "unsure" in a + b else reply
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        votes = llm_votes(["q1", "q2", "q3"], ["a good one", "meh", "good"], ["meh", "good", "good too"], url, "m")
        assert votes.tolist() == [1.0, -1.0, 0.0]
        Endpoint.biased = True
        assert llm_votes(["q1", "q2"], ["good", "x"], ["x", "good"], url, "m").tolist() == [0.0, 0.0]
        assert np.isnan(llm_votes(["q"], ["unsure"], ["good"], url, "m")).all()  # no choice named: no verdict
    finally:
        server.shutdown()
    with pytest.raises(UserError, match="LLM judge endpoint failed"):
        llm_votes(["q"], ["a"], ["b"], f"http://127.0.0.1:{server.server_port}/v1", "m", timeout=2)
