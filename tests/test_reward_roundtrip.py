"""One reward, whatever loads the RM: a directory saved by `save_reward_model` gives the same rewards in ser
(`score_pairs`, `ser score`), in plain transformers (`AutoModelForSequenceClassification` + `AutoTokenizer`, default
settings) and in TRL 1.12 (GRPO's reward-model path, `RewardTrainer`'s evaluation batches), for answers that end
with the eos token, chat-templated conversations and prompts cut from the left.

TRL's reward paths tokenize one string (GRPO: `prompt + completion` without special tokens) and pass no
token_type_ids, so they cannot reproduce an encoder's [CLS] prompt [SEP] answer [SEP]: the encoder (MiniLM) is
checked against transformers only.
"""

import json

import numpy as np
import pytest
import torch

from ser.checkpoint import save_reward_model
from ser.models import causal_join, load_reward_model
from ser.scoring import score_pairs

MAX_LENGTH = 64
TOL = 1e-5  # fp32: ser's packed pairs and transformers' separate sequences differ by rounding only (~1e-6)
LONG = " ".join(f"word{i % 7} is fine" for i in range(60)) + ". Which colour is the sky?"


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_llama_bos_dir", "tiny_bert_dir"])
def rm_dir(request, tmp_path_factory):
    """A saved RM whose linear layers (head included) have unit gain, N(0, 1/fan_in): rewards spread over units and
    depend on every token, so reading the wrong token or a wrongly cut text moves them far beyond TOL (the tiny
    backbones' 0.02-std init gives rewards that differ by 1e-4 between texts)."""
    backbone = request.getfixturevalue(request.param)
    rm, tok = load_reward_model(str(backbone))
    torch.manual_seed(0)
    with torch.no_grad():
        for m in rm.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
    config = {"config": {"model": {"max_length": MAX_LENGTH}}}
    return save_reward_model(rm, tok, tmp_path_factory.mktemp("rm") / "rm", config)


@pytest.fixture(scope="module")
def loaded(rm_dir):
    """The directory loaded twice: by ser (`load_reward_model`) and by plain transformers (default settings)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm, rm_tok = load_reward_model(str(rm_dir))
    return {"rm": rm, "rm_tok": rm_tok, "tok": AutoTokenizer.from_pretrained(rm_dir),
            "model": AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()}


def _cases(tok) -> dict:
    """name -> (prompts, chosen, rejected, conversations or None). Chat-templated pairs are the template's text
    split after the generation prompt: the answer is the rest (content, end-of-turn token, newline)."""
    eos = tok.eos_token or tok.sep_token  # BERT has no eos: its [SEP] is the token a text may end with
    cases = {
        "eos": (["How do I make tea?", "What is the tallest animal?", "Suggest a hobby."],
                ["Boil water, pour it over a tea bag and wait." + eos, "The giraffe." + eos, "Hiking." + eos],
                ["Tea is a drink." + eos, "Probably a cat, or a very tall dog." + eos, "Sleep." + eos], None),
        "long": ([LONG, LONG], ["Blue, on a clear day." + eos, "Grey." + eos],
                 ["It is green, like grass, all day and all night." + eos, "Blue." + eos], None),
    }
    if tok.chat_template:
        conv = [([{"role": "user", "content": "Hi! Name a colour."}], "Red.", "I would rather not, sorry."),
                ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "4", "5")]
        prompts, chosen, rejected = [], [], []
        for msgs, c, r in conv:
            p = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            full = [tok.apply_chat_template(msgs + [{"role": "assistant", "content": a}], tokenize=False)
                    for a in (c, r)]
            assert all(f.startswith(p) for f in full)
            prompts.append(p)
            chosen.append(full[0][len(p):])
            rejected.append(full[1][len(p):])
        cases["chat"] = (prompts, chosen, rejected, conv)
    return cases


def _join(prompt: str, answer: str) -> str:
    """The causal RM's text, as `ser.models.encode` joins it: one space, unless the join has whitespace already."""
    return answer if prompt[-1:].isspace() or answer[:1].isspace() else " " + answer


def transformers_rewards(loaded, prompts, chosen, rejected, max_length):
    """Plain transformers, written as a user would: the prompt is cut from the left, and both answers of a pair see
    the same prompt tokens (the cut fits the longer answer). Causal: one string prompt + answer; encoder: text pair."""
    tok, model = loaded["tok"], loaded["model"]
    tok.truncation_side = "left"
    causal = causal_join(tok) is not None
    out = []
    for p, c, r in zip(prompts, chosen, rejected):
        answers = [_join(p, a) for a in (c, r)] if causal else [c, r]
        n = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]
        rewards = []
        for a, k in zip(answers, n):
            limit = max_length - (max(n) - k)
            # a chat template that writes the bos (Llama 3, Gemma): no second one, as apply_chat_template tokenizes
            own_bos = bool(causal_join(tok)) and (p + a).startswith(tok.bos_token)
            enc = (tok(p + a, truncation=True, max_length=limit, return_tensors="pt", add_special_tokens=not own_bos)
                   if causal else tok(p, a, truncation="only_first", max_length=limit, return_tensors="pt"))
            with torch.no_grad():
                rewards.append(model(**enc).logits[0, 0].item())
        out.append(rewards)
    return np.array(out)  # (N, 2): chosen, rejected


def _cut_prompt(tok, prompt: str, answers: list[str], max_length: int) -> str:
    """The prompt text ser keeps (its last tokens), for tools that take text and do not truncate (TRL)."""
    lead = len(tok("a")["input_ids"]) - len(tok("a", add_special_tokens=False)["input_ids"])  # a bos, if added
    n = max(len(tok(_join(prompt, a), add_special_tokens=False)["input_ids"]) for a in answers) + lead
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    drop = len(enc["input_ids"]) - (max_length - n)
    # from the end of the last dropped token: byte-level offsets leave out a token's leading space
    return prompt if drop <= 0 else prompt[enc["offset_mapping"][drop - 1][1]:]


def test_pad_token_is_its_own_and_saved(rm_dir, loaded):
    """A causal RM's pad token is not eos (transformers would read an eos-ended answer before the eos), and the
    tokenizer and the model config saved in the directory agree on it."""
    tok = loaded["tok"]
    config = json.loads((rm_dir / "config.json").read_text())
    assert tok.pad_token_id is not None and tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    assert config["pad_token_id"] == tok.pad_token_id == loaded["rm_tok"].pad_token_id
    if causal_join(tok) is not None:  # SmolLM2 reserves no pad token: <|pad|> added, one row
        assert tok.pad_token == "<|pad|>" and config["vocab_size"] == len(tok) == 49153
        assert loaded["model"].get_input_embeddings().weight[tok.pad_token_id].abs().max() == 0
    else:
        assert tok.pad_token == "[PAD]" and tok.pad_token_id == 0


@pytest.mark.parametrize("case", ["eos", "long", "chat"])
def test_ser_equals_transformers(loaded, case):
    cases = _cases(loaded["tok"])
    if case not in cases:
        pytest.skip("the tokenizer has no chat template")
    prompts, chosen, rejected, _ = cases[case]
    ref = transformers_rewards(loaded, prompts, chosen, rejected, MAX_LENGTH)
    if case == "long":  # the prompt really is cut
        assert len(loaded["tok"](LONG)["input_ids"]) > 2 * MAX_LENGTH
    assert np.abs(ref[:, 0] - ref[:, 1]).min() > 100 * TOL  # the pair order checked below means something
    for share_prompt in (True, False):  # packed pairs (causal) and one sequence per answer
        r_c, r_r = score_pairs(loaded["rm"], loaded["rm_tok"], prompts, chosen, rejected, MAX_LENGTH,
                               share_prompt=share_prompt)
        np.testing.assert_allclose(np.stack([r_c, r_r], 1), ref, rtol=0, atol=TOL)
        assert ((r_c > r_r) == (ref[:, 0] > ref[:, 1])).all()


def test_ser_score_cli_equals_transformers(rm_dir, loaded, tmp_path):
    """`ser score` on a TRL-format file (the chat case as its template's strings) writes the same rewards."""
    from ser.cli import run

    rows = [(p, c, r) for prompts, chosen, rejected, _ in _cases(loaded["tok"]).values()
            for p, c, r in zip(prompts, chosen, rejected)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    assert run(["score", "--rm", str(rm_dir), "--data", str(data), "--out", str(tmp_path / "scores.jsonl")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    got = np.array([[x["r_chosen"], x["r_rejected"]] for x in lines])
    np.testing.assert_allclose(got, transformers_rewards(loaded, *zip(*rows), MAX_LENGTH), rtol=0, atol=TOL)


def _trl_inputs(tok, case, cases):
    """(prompts, completions) for TRL, chosen then rejected: text as ser joins it, the prompt already cut (TRL does
    not truncate); chat cases as messages, which TRL renders with the RM's chat template."""
    prompts, chosen, rejected, conv = cases[case]
    if conv is not None:
        return ([m for m, _, _ in conv] * 2,
                [[{"role": "assistant", "content": a}] for a in [c for _, c, _ in conv] + [r for _, _, r in conv]])
    cut = [_cut_prompt(tok, p, [c, r], MAX_LENGTH) for p, c, r in zip(prompts, chosen, rejected)]
    return cut * 2, [_join(p, a) for p, a in zip(cut * 2, list(chosen) + list(rejected))]


@pytest.fixture(scope="module")
def causal(loaded):
    if causal_join(loaded["tok"]) is None:
        pytest.skip("TRL's reward paths give an encoder no [CLS]/[SEP]/token_type_ids (see the module docstring)")
    return loaded


def test_trl_grpo_reward_model_equals_ser(rm_dir, causal, tiny_llama_dir, tmp_path):
    """GRPO with the RM as a reward function: `GRPOTrainer._calculate_rewards` (TRL loads the RM's tokenizer from
    the directory, pads on the right and sets `config.pad_token_id` from it)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import GRPOConfig, GRPOTrainer

    if causal_join(causal["tok"]):
        pytest.skip("GRPO tokenizes prompt + completion without special tokens: an RM whose tokenizer adds bos gets "
                    "none there (transformers' default call and RewardTrainer add it, as ser does)")
    cases = _cases(causal["tok"])
    trainer = GRPOTrainer(
        model=str(tiny_llama_dir), reward_funcs=AutoModelForSequenceClassification.from_pretrained(rm_dir),
        args=GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, report_to="none",
                        use_cpu=True, bf16=False, max_completion_length=4),
        train_dataset=Dataset.from_list([{"prompt": "Hi"}] * 2))
    for case in cases:
        prompts, completions = _trl_inputs(causal["tok"], case, cases)
        trl = trainer._calculate_rewards([{"prompt": p} for p in prompts], prompts, completions,
                                         [None] * len(prompts))[:, 0].double().numpy()
        r_c, r_r = score_pairs(causal["rm"], causal["rm_tok"], *cases[case][:3], MAX_LENGTH)
        np.testing.assert_allclose(np.concatenate([r_c, r_r]), trl, rtol=0, atol=TOL, err_msg=case)
        assert ((r_c > r_r) == (trl[: len(r_c)] > trl[len(r_c) :])).all()


def test_trl_reward_trainer_eval_equals_ser(rm_dir, causal, tmp_path):
    """`RewardTrainer` evaluation: its dataset preparation (prompt + answer, eos appended if missing, the chat
    template for messages), its collator and `compute_loss`'s forward pass; answers here end with eos."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    cases = _cases(causal["tok"])
    datasets = {}
    for case in cases:
        prompts, completions = _trl_inputs(causal["tok"], case, cases)
        n = len(prompts) // 2
        datasets[case] = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r}
                                            for p, c, r in zip(prompts[:n], completions[:n], completions[n:])])
    trainer = RewardTrainer(model=str(rm_dir), train_dataset=datasets["eos"], eval_dataset=datasets,
                            args=RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                                              per_device_eval_batch_size=16))
    for case in cases:
        batch = next(iter(trainer.get_eval_dataloader(case)))
        with torch.no_grad():
            trl = trainer.model(**batch).logits[:, 0].double().numpy()  # chosen then rejected, as compute_loss
        r_c, r_r = score_pairs(causal["rm"], causal["rm_tok"], *cases[case][:3], MAX_LENGTH)
        np.testing.assert_allclose(np.concatenate([r_c, r_r]), trl, rtol=0, atol=TOL, err_msg=case)
        metrics = trainer.evaluate(case)  # TRL's own reward metrics, from the same forward pass
        assert metrics["eval_accuracy"] == pytest.approx(float(np.mean(r_c > r_r)))
        assert metrics["eval_margin"] == pytest.approx(float(np.mean(r_c - r_r)), abs=TOL)


def test_the_readme_snippet_gives_ser_scores_reward(rm_dir):
    """README's plain-transformers snippet, run as printed (its RM path swapped for this one), reads the reward
    `ser score` gives the same pair, with max_length taken from the RM's ser_config.json as the snippet does."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"The snippet below.*?```python\n(.*?)```", readme, re.S).group(1)
    if json.loads((rm_dir / "config.json").read_text())["model_type"] != "bert":
        pytest.skip("the snippet as printed is the encoder's form (its comment gives the causal one)")
    scope = {}
    exec(code.replace("runs/demo/final", str(rm_dir)), scope)  # noqa: S102 (the README's own code)
    rm, tok = load_reward_model(str(rm_dir))
    r, _ = score_pairs(rm, tok, [scope["prompt"]], [scope["answer"]], ["Never."], MAX_LENGTH)
    assert scope["max_length"] == MAX_LENGTH and scope["reward"] == pytest.approx(float(r[0]), abs=TOL)
