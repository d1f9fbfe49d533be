"""model.mode=freeze: frozen lower layers, the cache of their output, and that it changes nothing but the speed."""

import os

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed

from ser.checkpoint import save_reward_model
from ser.config import TrainConfig, load_config
from ser.errors import UserError
from ser.frozen import FrozenCache, attach_cache, transformer_layers
from ser.models import collate, encode_pairs, load_reward_model, pack_pairs, packed_pair_rewards
from ser.scoring import score_pairs
from ser.train import make_accelerator, train_reward_model

PROMPTS = ["Human: how do I bake bread?\n\nAssistant:", "Human: what is 2+2?\n\nAssistant:",
           "Human: name a colour\n\nAssistant:", "Human: tell me a joke about cats and dogs\n\nAssistant:"] * 3
CHOSEN = ["Mix flour, water, yeast; knead and bake.", "It is 4.", "Blue.", "Why did the cat sit on the laptop?"] * 3
REJECTED = ["No.", "Five, probably.", "I will not answer that question at all.", "Cats."] * 3


@pytest.fixture(params=["tiny_bert_dir", "tiny_llama_dir"])
def backbone(request) -> str:
    return str(request.getfixturevalue(request.param))


def load(backbone: str, n: int = 1, seed: int = 0):
    set_seed(seed)  # the score head's initialisation
    return load_reward_model(backbone, "freeze", trainable_layers=n)


def test_freeze_mode_trains_only_the_top_layers_and_head(backbone):
    rm, _ = load(backbone, n=1)
    layers, embeddings = transformer_layers(rm)
    assert not any(p.requires_grad for p in embeddings.parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    frozen = {id(p) for m in (embeddings, layers[0]) for p in m.parameters()}
    trainable = [n for n, p in rm.named_parameters() if id(p) not in frozen]
    assert trainable and all(p.requires_grad for n, p in rm.named_parameters() if id(p) not in frozen)
    assert any("classifier" in n or "score" in n for n in trainable)


def test_trainable_layers_out_of_range_is_a_user_error(tiny_bert_dir):
    with pytest.raises(UserError, match="model.trainable_layers.*2 layers.*got 3"):
        load_reward_model(str(tiny_bert_dir), "freeze", trainable_layers=3)
    with pytest.raises(UserError, match="'model.trainable_layers' must be >= 1"):
        load_config(overrides=["--model.mode=freeze", "--model.trainable_layers=0"])
    assert load_config(overrides=["--model.mode=freeze"]).model.trainable_layers == 2


def test_cached_rewards_equal_the_full_forward(backbone):
    rm, tok = load(backbone)
    rm.eval()
    enc = encode_pairs(tok, PROMPTS, CHOSEN, REJECTED, 32)
    cache = FrozenCache(rm, tok)
    with torch.no_grad():
        full = rm(**collate(enc.input_ids, enc.token_type_ids, tok.pad_token_id)).logits[:, 0]
        cached = cache.rewards(rm, enc.input_ids, enc.token_type_ids, tok.pad_token_id, 32)
        again = cache.rewards(rm, enc.input_ids, enc.token_type_ids, tok.pad_token_id, 32)
    assert full.std() > 0  # the check would pass trivially on constant rewards
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    n_seqs = len(set(map(tuple, enc.input_ids)))
    assert torch.equal(cached, again) and cache.misses == n_seqs and cache.hits == 2 * len(enc.input_ids) - n_seqs


def test_packed_pairs_on_cached_states_equal_the_packed_full_forward(tiny_llama_dir):
    """A causal RM's pairs as packed rows (`pair_rewards`): the frozen part runs once per pair and stores both
    sequences' states (equal to their own forward's, 1e-5); the rewards equal the full model's packed and unpacked
    forward. The prompts are long enough (and the answers different enough in length) that packing saves tokens."""
    rm, tok = load(str(tiny_llama_dir))
    rm.eval()
    enc = encode_pairs(tok, PROMPTS, CHOSEN, REJECTED, 32)
    n = len(PROMPTS)
    plen = enc.prompt_lengths[:n]  # per sequence; a pair's two are equal
    ids_a, ids_b = enc.input_ids[:n], enc.input_ids[n:]
    assert min(plen) >= 8 and enc.prompt_lengths[n:] == plen
    packed_cache, plain_cache = FrozenCache(rm, tok), FrozenCache(rm, tok)
    with torch.no_grad():
        full_a, full_b = packed_pair_rewards(rm, pack_pairs(ids_a, ids_b, plen, tok.pad_token_id))
        r_a, r_b = packed_cache.pair_rewards(rm, ids_a, ids_b, plen, tok.pad_token_id, 32)
        again = packed_cache.pair_rewards(rm, ids_a, ids_b, plen, tok.pad_token_id, 32)
        plain = plain_cache.rewards(rm, enc.input_ids, None, tok.pad_token_id, 32)
        own = [plain_cache.get(plain_cache.key(32, ids, None)) for ids in enc.input_ids]
    assert full_a.std() > 0 and (full_a - full_b).abs().max() > 0  # not trivially equal
    torch.testing.assert_close(r_a, full_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(r_b, full_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([r_a, r_b]), plain, atol=1e-5, rtol=0)
    stored = [packed_cache.get(packed_cache.key(32, ids, None)) for ids in enc.input_ids]
    for s, o in zip(stored, own):  # the states of each sequence, taken from its packed row
        torch.testing.assert_close(s, o, atol=1e-5, rtol=0)
    n_seqs = len(set(map(tuple, enc.input_ids)))  # the 12 pairs are 4 distinct ones, 3 times
    assert torch.equal(again[0], r_a) and packed_cache.misses == n_seqs
    assert packed_cache.hits == 2 * len(enc.input_ids) - n_seqs


def test_identical_answers_are_exact_ties_on_packed_rows(tiny_llama_dir, monkeypatch):
    """A pair whose answers are the same tokens has one reward, bit for bit, whether its packed row runs on the full
    model or on cached states (on a packed row b's copy sits elsewhere in the batch, where rounding may differ,
    and a tie counts as wrong in `pair_metrics`). The cache here already holds one side of two pairs: only the
    missing sequences are computed, each once."""
    rm, tok = load(str(tiny_llama_dir))
    prompts, a = PROMPTS[:4] * 2, CHOSEN[:4] * 2
    b = REJECTED[:4] + CHOSEN[:4]  # the last 4 pairs: identical answers
    plain = score_pairs(rm, tok, prompts, a, b, 32)
    cache = FrozenCache(rm, tok)
    attach_cache(rm, cache)
    first_two = encode_pairs(tok, PROMPTS[:2], CHOSEN[:2], REJECTED[:2], 32).input_ids[:2]  # their chosen sequences
    cache.rewards(rm, first_two, None, tok.pad_token_id, 32)
    import ser.frozen as frozen

    rows, real = {True: 0, False: 0}, frozen.forward_bottom  # frozen-part rows run packed / one sequence each
    monkeypatch.setattr(frozen, "forward_bottom", lambda m, batch: rows.__setitem__(
        "position_ids" in batch, rows["position_ids" in batch] + len(batch["input_ids"])) or real(m, batch))
    cached = score_pairs(rm, tok, prompts, a, b, 32)
    assert rows == {True: 2, False: 2}  # pairs 2, 3 packed; the rejected answers of pairs 0, 1 alone
    for r_a, r_b in (plain, cached):
        assert np.array_equal(r_a[4:], r_b[4:]) and not np.array_equal(r_a[:4], r_b[:4])
    np.testing.assert_allclose(np.concatenate(cached), np.concatenate(plain), atol=1e-5, rtol=0)
    assert cache.misses == len(cache.memory) == 8  # 4 prompts x (chosen, rejected), each computed once


def train(backbone: str, cached: bool, share_prompt: bool = False):
    rm, tok = load(backbone)
    if cached:
        attach_cache(rm, FrozenCache(rm, tok))
    losses = []
    tcfg = TrainConfig(epochs=3, batch_size=4, lr=1e-3, warmup_ratio=0.0)
    rm, _ = train_reward_model(rm, tok, PROMPTS, CHOSEN, REJECTED, tcfg, 32, accelerator=make_accelerator(tcfg),
                               share_prompt=share_prompt,
                               on_step=lambda step, record, m: losses.append(record["train/loss"]))
    return rm, tok, losses


def test_cached_and_uncached_training_agree(backbone):
    """Same per-step losses (1e-5) and the same rewards after training, dropout on in the top layers (BERT)."""
    rm_c, tok, cached = train(backbone, cached=True)
    rm_u, _, uncached = train(backbone, cached=False)
    assert len(cached) == 9 and np.ptp(cached) > 1e-3  # the weights move from step to step: a real comparison
    np.testing.assert_allclose(cached, uncached, atol=1e-5, rtol=0)
    r_cached = score_pairs(rm_c, tok, PROMPTS, CHOSEN, REJECTED, 32)
    attach_cache(rm_c, None)
    r_plain = score_pairs(rm_c, tok, PROMPTS, CHOSEN, REJECTED, 32, share_prompt=False)
    r_uncached = score_pairs(rm_u, tok, PROMPTS, CHOSEN, REJECTED, 32, share_prompt=False)
    for a, b in zip(r_cached, r_plain):  # one model, with and without its cache
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # the two trainings' rewards, up to one constant: the reward head's bias gets no gradient from a pairwise loss
    # (it cancels), only rounding residue, which Adam scales up to steps of the learning rate (measured: 2.8e-5 on
    # every reward, AMD EPYC with AVX2 only); the margins and every other difference agree to 1e-5
    cat_c, cat_u = np.concatenate(r_cached), np.concatenate(r_uncached)
    np.testing.assert_allclose(cat_c - cat_c.mean(), cat_u - cat_u.mean(), atol=1e-5, rtol=0)
    assert abs(cat_c.mean() - cat_u.mean()) < 1e-3
    layers, embeddings = transformer_layers(rm_c)
    fresh, _ = load(backbone)
    fresh_layers, fresh_embeddings = transformer_layers(fresh)
    assert all(torch.equal(a, b) for a, b in zip(embeddings.parameters(), fresh_embeddings.parameters()))
    assert not torch.equal(next(layers[-1].parameters()), next(fresh_layers[-1].parameters()))


def test_packed_cached_training_agrees_with_packed_and_unpacked_training(tiny_llama_dir):
    """A causal RM in freeze mode trains on packed pairs from cached states: the same per-step losses (1e-5) as
    packed training without the cache, and its packed cached rewards afterwards equal an unpacked, uncached
    forward. (Unpacked training groups its batches by another length, so its steps are not comparable.)"""
    rm_p, tok, packed_cached = train(str(tiny_llama_dir), cached=True, share_prompt=True)
    _, _, packed_plain = train(str(tiny_llama_dir), cached=False, share_prompt=True)
    assert len(packed_cached) == 9 and packed_cached[-1] < packed_cached[0]  # it learned
    np.testing.assert_allclose(packed_cached, packed_plain, atol=1e-5, rtol=0)
    r_cached = score_pairs(rm_p, tok, PROMPTS, CHOSEN, REJECTED, 32)  # packed, on the cache
    attach_cache(rm_p, None)
    r_plain = score_pairs(rm_p, tok, PROMPTS, CHOSEN, REJECTED, 32, share_prompt=False)
    for a, b in zip(r_cached, r_plain):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_saved_rm_gives_the_same_rewards_in_transformers(backbone, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm, tok, _ = train(backbone, cached=True)
    save_reward_model(rm, tok, tmp_path / "rm", {})
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    # as README's snippet reads an RM (no truncation at these lengths): an encoder takes the text pair, a causal RM
    # prompt + " " + answer
    encoder = model.config.model_type == "bert"
    with torch.no_grad():
        hf = [model(**(hf_tok(p, a, return_tensors="pt") if encoder else hf_tok(p + " " + a, return_tensors="pt")))
              .logits[0, 0].item() for p, a in zip(PROMPTS, CHOSEN)]
    ser, _ = score_pairs(rm, tok, PROMPTS, CHOSEN, REJECTED, 64)
    np.testing.assert_allclose(ser, hf, atol=1e-5, rtol=0)


def test_cache_keys_change_with_n_and_max_length(tiny_bert_dir):
    rm1, tok = load(str(tiny_bert_dir), n=1)
    rm2, _ = load(str(tiny_bert_dir), n=2)
    ids = encode_pairs(tok, PROMPTS[:1], CHOSEN[:1], REJECTED[:1], 32).input_ids[0]
    c1, c2 = FrozenCache(rm1, tok), FrozenCache(rm2, tok)
    assert c1.key(32, ids, None) != c1.key(64, ids, None)  # max_length
    assert c1.key(32, ids, None) != c2.key(32, ids, None)  # N
    assert c1.key(32, ids, None) == FrozenCache(load(str(tiny_bert_dir), n=1, seed=1)[0], tok).key(32, ids, None)
    with torch.no_grad():  # the frozen weights change: a different identity
        transformer_layers(rm1)[0][0].output.dense.bias.add_(1.0)
    assert FrozenCache(rm1, tok).key(32, ids, None) != c1.key(32, ids, None)


@pytest.mark.parametrize("damage", ["truncate", "flip", "swap"])
def test_damaged_cache_file_is_rebuilt_not_used(tiny_bert_dir, tmp_path, damage):
    rm, tok = load(str(tiny_bert_dir))
    rm.eval()
    enc = encode_pairs(tok, PROMPTS[:2], CHOSEN[:2], REJECTED[:2], 32)
    cache = FrozenCache(rm, tok, directory=tmp_path)
    first = cache.states(rm, enc.input_ids, enc.token_type_ids, tok.pad_token_id, 32)
    files = sorted(tmp_path.glob("*.bin"))
    assert len(files) == 4 and not list(tmp_path.glob("*.tmp*"))
    target = tmp_path / f"{cache.key(32, enc.input_ids[0], enc.token_type_ids[0]).hex()}.bin"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:  # another entry's (valid) file under this key
        other = next(f for f in files if f != target)
        target.write_bytes(other.read_bytes())
    fresh = FrozenCache(rm, tok, directory=tmp_path)
    again = fresh.states(rm, enc.input_ids, enc.token_type_ids, tok.pad_token_id, 32)
    assert fresh.rebuilt == 1 and fresh.misses == 1 and fresh.hits == 3
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert target.read_bytes() == data  # rewritten whole


def test_writers_sharing_a_cache_directory_never_collide(tiny_bert_dir, tmp_path):
    """Two writers of one entry at once (threads here; processes of two containers with the same pid in use) each
    write a temporary file of their own: no writer fails, the entry is whole, the file has the umask's mode, and a
    day-old temporary file that a killed writer left is removed when a cache opens the directory (a fresh one,
    maybe a live writer's, is kept)."""
    import stat
    import threading
    import time

    from ser.checkpoint import current_umask

    rm, tok = load(str(tiny_bert_dir))
    cache = FrozenCache(rm, tok, directory=tmp_path)
    key, states = cache.key(32, [1, 2, 3], None), torch.randn(3, 32)
    errors = []

    def write():
        try:
            for _ in range(200):
                cache.put(key, states)
        except Exception as e:  # noqa: BLE001 (collected for the assertion)
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and torch.equal(cache.get(key), states) and not list(tmp_path.glob("*.tmp"))
    entry = tmp_path / f"{key.hex()}.bin"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o666 & ~current_umask()
    old, young = tmp_path / f"{key.hex()}.abc.tmp", tmp_path / f"{key.hex()}.def.tmp"
    old.write_bytes(b"x")
    young.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    FrozenCache(rm, tok, directory=tmp_path)
    assert not old.exists() and young.exists() and entry.exists()


@pytest.mark.parametrize("value", ["8GiB", "-1", "nan", "inf", ""])
def test_a_bad_memory_cap_is_a_one_line_error(value, tiny_bert_dir, monkeypatch, tmp_path):
    """$SER_FROZEN_CACHE_GIB is read when a cache uses it, not at import (a typo crashed every command with a
    traceback), and a bad value stops any command before it writes."""
    import subprocess
    import sys

    from ser.frozen import memory_cap_gib

    monkeypatch.setenv("SER_FROZEN_CACHE_GIB", "0.5")
    assert memory_cap_gib() == 0.5
    monkeypatch.setenv("SER_FROZEN_CACHE_GIB", value)
    with pytest.raises(UserError, match="SER_FROZEN_CACHE_GIB"):
        memory_cap_gib()
    if value == "8GiB":
        out = tmp_path / "scores.jsonl"
        r = subprocess.run([sys.executable, "-m", "ser", "score", "--rm", str(tiny_bert_dir), "--data",
                            str(tmp_path / "missing.jsonl"), "--out", str(out)], capture_output=True, text=True,
                           env={**os.environ, "SER_FROZEN_CACHE_GIB": value})
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            "error: SER_FROZEN_CACHE_GIB='8GiB': expected a number of GiB >= 0 (e.g. 8 or 0.5)"]
        assert not out.exists()


def test_a_continued_rm_reuses_the_entries_of_the_previous_one(tiny_bert_dir, tmp_path):
    """SER's next iteration continues from the saved RM: same frozen part, so a shared store hits."""
    rm, tok, _ = train(str(tiny_bert_dir), cached=True)
    first = rm.ser_frozen_cache
    save_reward_model(rm, tok, tmp_path / "rm", {})
    again, tok2 = load_reward_model(str(tmp_path / "rm"), "freeze", trainable_layers=1)
    cache = FrozenCache(again, tok2, memory=first.memory)
    attach_cache(again, cache)
    score_pairs(again, tok2, PROMPTS, CHOSEN, REJECTED, 32)
    assert cache.misses == 0 and cache.hits == 2 * len(PROMPTS)


def test_fit_rm_in_freeze_mode_trains_with_the_cache_and_scores_with_it(tiny_bert_dir):
    from ser.data import Pair
    from ser.pipeline import evaluate_rm, fit_rm

    cfg = load_config(overrides=[f"--model.backbone={tiny_bert_dir}", "--model.mode=freeze", "--model.max_length=32",
                                 "--model.trainable_layers=1", "--train.epochs=2", "--train.batch_size=4"])
    rm, tok, summary = fit_rm(cfg, PROMPTS, CHOSEN, REJECTED, accelerator=make_accelerator(cfg.train))
    cache = rm.ser_frozen_cache
    n_seqs = len(set(map(tuple, encode_pairs(tok, PROMPTS, CHOSEN, REJECTED, 32).input_ids)))
    assert summary["steps"] == 6 and len(cache.memory) == n_seqs == cache.misses  # each sequence computed once
    hits = cache.hits
    pairs = [Pair(id=str(i), prompt=p, chosen=c, rejected=r, source="t")
             for i, (p, c, r) in enumerate(zip(PROMPTS, CHOSEN, REJECTED))]
    evaluate_rm(rm, tok, pairs, cfg)
    assert cache.misses == n_seqs and cache.hits == hits + 2 * len(pairs)  # evaluation read training's states


def test_fp16_store_halves_the_size_and_states_are_fp32_under_autocast(tiny_bert_dir, tmp_path):
    rm, tok = load(str(tiny_bert_dir))
    rm.eval()
    enc = encode_pairs(tok, PROMPTS, CHOSEN, REJECTED, 32)
    exact, half = FrozenCache(rm, tok), FrozenCache(rm, tok, directory=tmp_path, dtype=torch.float16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a miss under bf16 scoring
        exact.states(rm, enc.input_ids, enc.token_type_ids, tok.pad_token_id, 32)
    with torch.no_grad():
        r32 = exact.rewards(rm, enc.input_ids, enc.token_type_ids, tok.pad_token_id, 32)
        r16 = half.rewards(rm, enc.input_ids, enc.token_type_ids, tok.pad_token_id, 32)
        full = rm(**collate(enc.input_ids, enc.token_type_ids, tok.pad_token_id)).logits[:, 0]
    torch.testing.assert_close(r32, full, atol=1e-5, rtol=0)  # the bf16 autocast did not reach the cached states
    torch.testing.assert_close(r16, full, atol=1e-2, rtol=0)
    assert abs(half.nbytes() - exact.nbytes() / 2) < 200 * len(exact.memory)  # + a 113-byte header per file
    # an fp32 cache given the fp16 cache's directory computes its own entries beside them (the key holds the
    # dtype), never reading rounded states, and leaves the fp16 ones in place
    fp16_files = sorted(tmp_path.glob("*.bin"))
    distinct = encode_pairs(tok, PROMPTS[:4], CHOSEN[:4], REJECTED[:4], 32)  # 8 distinct sequences
    again = FrozenCache(rm, tok, directory=tmp_path)
    with torch.no_grad():
        r = again.rewards(rm, distinct.input_ids, distinct.token_type_ids, tok.pad_token_id, 32)
    assert again.misses == 8 and again.hits == again.rebuilt == 0
    assert len(list(tmp_path.glob("*.bin"))) == len(fp16_files) + 8 and all(f.exists() for f in fp16_files)
    # the same in memory: an fp16 cache given the fp32 cache's dict misses, never reads unrounded states
    shared = FrozenCache(rm, tok, dtype=torch.float16, memory=exact.memory)
    with torch.no_grad():
        shared.rewards(rm, distinct.input_ids, distinct.token_type_ids, tok.pad_token_id, 32)
    assert shared.misses == 8 and shared.hits == 0
    torch.testing.assert_close(r, torch.cat([full[:4], full[12:16]]), atol=1e-5, rtol=0)  # (a_0..a_3, b_0..b_3)


def test_an_ser_run_computes_each_texts_frozen_states_once(backbone, shared_data, tmp_path, monkeypatch):
    """Seed RM, pool scoring, calibration, retraining and evaluation of every iteration share one store: over a
    whole 2-iteration run, each distinct sequence's frozen states are computed and stored once. A causal RM runs
    its frozen part on packed pairs (one row per pair, the prompt once), an encoder on single sequences."""
    import ser.frozen as frozen
    from ser.evolve import run_evolve
    from ser.frozen import SHARED_MEMORY
    from tests.test_evolve import records, tiny_overrides

    rows = {True: 0, False: 0}  # frozen-part rows run packed (two sequences each) / one sequence each
    stored = []
    real_bottom, real_put = frozen.forward_bottom, frozen.FrozenCache.put

    def counting(model, batch):
        rows["position_ids" in batch] += batch["input_ids"].shape[0]
        return real_bottom(model, batch)

    def put(self, key, states):
        stored.append(key)
        return real_put(self, key, states)

    monkeypatch.setattr(frozen, "forward_bottom", counting)
    monkeypatch.setattr(frozen.FrozenCache, "put", put)
    cfg = load_config(None, tiny_overrides(backbone, **{"model.mode": "freeze", "model.trainable_layers": 1}))
    run = run_evolve(cfg, str(tmp_path / "run"))
    assert max(r["iteration"] for r in records(run)) == 2  # seed RM + 2 iterations ran
    assert len(stored) == len(set(stored)) == len(SHARED_MEMORY) > 0  # 128 pairs' sequences, none twice
    if "llama" in backbone:  # mostly packed rows, and every sequence a row computed was stored
        assert rows[True] > rows[False] and 2 * rows[True] + rows[False] == len(SHARED_MEMORY)
    else:
        assert rows[True] == 0 and rows[False] == len(SHARED_MEMORY)


def test_memory_store_cap_computes_instead_of_keeping(tiny_bert_dir, caplog):
    """Past its cap the in-memory store keeps nothing more (one warning), and rewards stay exact."""
    from ser.frozen import MemoryStore

    rm, tok = load(str(tiny_bert_dir))
    rm.eval()
    enc = encode_pairs(tok, PROMPTS, CHOSEN, REJECTED, 32)
    one = 4 * 32 * max(len(ids) for ids in enc.input_ids)  # bytes of the longest sequence's states, fp32, H = 32
    store = MemoryStore(limit_gib=2.5 * one / 2**30)
    cache = FrozenCache(rm, tok, memory=store)
    with torch.no_grad():
        capped = cache.rewards(rm, enc.input_ids, enc.token_type_ids, tok.pad_token_id, 32)
        full = rm(**collate(enc.input_ids, enc.token_type_ids, tok.pad_token_id)).logits[:, 0]
    torch.testing.assert_close(capped, full, atol=1e-5, rtol=0)
    assert 2 <= len(store) < len(set(map(tuple, enc.input_ids))) and store.nbytes <= store.limit
    # each entry holds its own (T, H) copy, not a view keeping the whole padded batch alive: the cap counts it all
    assert store.nbytes == sum(t.untyped_storage().nbytes() for t in store.values())
    assert sum("reached its" in r.message for r in caplog.records) == 1
