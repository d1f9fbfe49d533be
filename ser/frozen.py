"""Frozen lower layers (`model.mode=freeze`): only the top N transformer layers and the reward head train, and the
frozen part's output is computed once per tokenized sequence and reused (LLaMA-Factory's `finetuning_type: freeze`
with `freeze_trainable_layers: N`, plus a cache of the frozen activations).

The frozen part is the embeddings and the lower L-N layers. Its output for a sequence, the hidden states after
layer L-N, (T, H), depends only on the frozen weights and the sequence's token ids, so `FrozenCache` keeps it and
every later epoch, scoring pass or evaluation runs only the top N layers and the head (`forward_top`, or
`forward_top_packed` for packed pairs). The frozen part runs without dropout (`freeze_lower_layers` sets it to 0): a
fixed feature extractor, and the condition for the cached states to equal what an uncached forward computes. The
saved RM is still one ordinary `AutoModelForSequenceClassification` directory (the frozen weights unchanged).

Supported families: BERT encoders (MiniLM) and Llama decoders (SmolLM2). Where a causal RM packs its pairs
(`model.share_prompt` on and `ser.models.can_share_prompt`: SDPA attention, no pair template), pair training and
scoring pack them here too: the frozen part runs once per pair on the packed [prompt, a, b] row
(`ser.models.pack_pairs`) and stores the states of its two sequences (prompt + a, prompt + b) under their usual
keys, and the top layers run on the packed row rebuilt from the cache (`FrozenCache.pair_rewards`), so a prompt's
tokens are computed once per pair in both parts. The stored states equal each sequence's own forward up to float
rounding, since a causal model's states of a prompt do not depend on what follows it. Single texts
(`score_texts`) run unpacked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import time
from pathlib import Path

import numpy as np
import torch

from ser.checkpoint import atomic_write_bytes
from ser.errors import UserError, shown

log = logging.getLogger(__name__)


def _base(model):
    """The backbone inside a `...ForSequenceClassification` (`model.bert`, `model.model`)."""
    return getattr(model, model.base_model_prefix)


def transformer_layers(model) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """(the transformer layers, the embedding module) of a BERT or Llama reward model; other families: UserError."""
    kind, base = model.config.model_type, _base(model)
    if kind == "bert":
        return base.encoder.layer, base.embeddings
    if kind == "llama":
        return base.layers, base.embed_tokens
    raise UserError(f"model.mode=freeze supports BERT and Llama backbones, not '{kind}'; use model.mode=full or lora")


def freeze_lower_layers(model, trainable_layers: int) -> None:
    """requires_grad False for the embeddings and the lower L-N layers, True for the rest (top N layers, final
    norm, pooler, head); dropout off in the frozen part. Raises UserError unless 1 <= N <= L."""
    layers, embeddings = transformer_layers(model)
    if not 1 <= trainable_layers <= len(layers):
        raise UserError(f"config: 'model.trainable_layers' must be between 1 and the backbone's {len(layers)} layers, "
                        f"got {trainable_layers}")
    frozen = [embeddings, *layers[: len(layers) - trainable_layers]]
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) not in frozen_ids
    for part in frozen:
        disable_dropout(part)
    model.ser_trainable_layers = trainable_layers


def disable_dropout(module: torch.nn.Module) -> None:
    """Dropout off in `module`, whatever its train/eval mode: every `nn.Dropout`'s p and a Llama attention's
    `attention_dropout` (a float, not a module) set to 0 (TRL's `disable_dropout_in_model` does the first)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def _run_layers(model, hidden: torch.Tensor, attention_mask: torch.Tensor, layers,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`layers` applied to hidden (B, T, H) with the mask and positions the backbone's own forward builds; a Llama
    also takes packed pairs: the (B, 1, T, T) boolean mask and (B, T) positions of `ser.models.pack_pairs`."""
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    base = _base(model)
    if model.config.model_type == "bert":
        mask = create_bidirectional_mask(config=base.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden
    if position_ids is None:  # right-padded: positions 0..T-1 as LlamaModel builds them without position_ids
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, T)
    # a prepared 4D mask (packed pairs) is passed through as it is, as in the backbone's own forward
    mask = create_causal_mask(config=base.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              past_key_values=None, position_ids=position_ids)
    rotary = base.rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids,
                       past_key_values=None, use_cache=False)
    return hidden


@torch.no_grad()
def forward_bottom(model, batch: dict) -> torch.Tensor:
    """The frozen part on a collated batch (`ser.models.collate`) or, for a Llama, on packed pairs
    (`ser.models.pack_pairs`): hidden states (B, T, H) after layer L-N."""
    layers, embeddings = transformer_layers(model)
    if model.config.model_type == "bert":
        hidden = embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    else:
        hidden = embeddings(batch["input_ids"])
    return _run_layers(model, hidden, batch["attention_mask"], layers[: len(layers) - model.ser_trainable_layers],
                       batch.get("position_ids"))


def forward_top(model, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rewards (B,) from the frozen part's output (B, T, H) and the (B, T) mask of right-padded sequences: the top
    N layers, then BERT's pooler + classifier or Llama's final norm + score head at the last real token."""
    layers, _ = transformer_layers(model)
    hidden = _run_layers(model, hidden, attention_mask, layers[len(layers) - model.ser_trainable_layers :])
    base = _base(model)
    if model.config.model_type == "bert":
        return model.classifier(model.dropout(base.pooler(hidden)))[:, 0]
    last = attention_mask.sum(1) - 1  # (B,): right padding, and ser's pad token never occurs in text
    hidden = base.norm(hidden)[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return model.score(hidden)[:, 0]


def forward_top_packed(model, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_a, r_b), each (B,), of packed pairs from the frozen part's output (B, T, H) of the `pack_pairs` rows in
    `batch`: the top N layers under the packed mask and positions, then the final norm and score head at the last
    token of each answer (as `ser.models.packed_pair_rewards` reads the full model)."""
    layers, _ = transformer_layers(model)
    hidden = _run_layers(model, hidden, batch["attention_mask"], layers[len(layers) - model.ser_trainable_layers :],
                         batch["position_ids"])
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    norm, score = _base(model).norm, model.score
    return (score(norm(hidden[rows, batch["last_a"]]))[:, 0], score(norm(hidden[rows, batch["last_b"]]))[:, 0])


MAGIC = b"SERFC001"
_HEADER = struct.Struct("<8s32s32sqqB")  # magic, key, sha256 of the payload, T, H, dtype (0 fp32, 1 fp16)
_DTYPES = {torch.float32: (0, np.float32), torch.float16: (1, np.float16)}


class FrozenCache:
    """Frozen-part outputs by sequence: key = sha256 of (backbone identity, N, vocabulary, max_length, token ids,
    token type ids, and the dtype unless fp32) -> hidden states (T, H), stored in `dtype` (fp32 by default: cached
    training equals uncached fp32 training; fp16 halves the size and rounds the states). The frozen part always runs
    in fp32 here: under bf16 autocast (`train.mixed_precision`) the uncached forward (DDP, DeepSpeed and FSDP
    train freeze mode without the cache) rounds the frozen states, so rewards differ by bf16 rounding (up to 0.007
    on MiniLM with rewards spread 0.3: a near-tie pair can flip).

    The backbone identity hashes the config and the frozen weights themselves, so an RM that continues from a
    previous one (SER's next iteration) with the same frozen part hits the same entries, and any change to them
    misses. Without `directory` the entries live in memory (a dict); with it, each entry is one file there, written
    atomically (temporary file + os.replace) and checked on every read (header, key, length, sha256 of the
    payload): a truncated, corrupt or mismatched file is rebuilt, never used. Files are not held in memory.
    To reuse entries with another model object (a reloaded or continued RM), pass the same `directory`, or the
    `memory` dict of an earlier cache: the keys tell which entries still apply.
    """

    def __init__(self, model, tokenizer, directory: str | Path | None = None, dtype: torch.dtype = torch.float32,
                 memory: dict | None = None):
        self.dtype, self.directory = dtype, Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            remove_stale_writes(self.directory)
        self.memory: dict[bytes, torch.Tensor] = {} if memory is None else memory
        self.hits = self.misses = self.rebuilt = 0
        self.identity = backbone_identity(model, tokenizer)

    def key(self, max_length: int, input_ids: list[int], token_type_ids: list[int] | None) -> bytes:
        h = hashlib.sha256(self.identity)
        # and a storage dtype other than fp32 (fp32 caches written before keep their keys): an fp32 and an fp16
        # cache may share a directory or a memory dict, each with its own entries
        extra = [] if self.dtype == torch.float32 else [str(self.dtype)]
        h.update(json.dumps([max_length, input_ids, token_type_ids, *extra]).encode())
        return h.digest()

    def get(self, key: bytes) -> torch.Tensor | None:
        if self.directory is None:
            return self.memory.get(key)
        path = self.directory / f"{key.hex()}.bin"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        states = _decode(data, key, _DTYPES[self.dtype][0])
        if states is None:
            log.warning("%s: truncated, corrupt or mismatched frozen-cache entry; rebuilding it", path)
            self.rebuilt += 1
        return states

    def put(self, key: bytes, states: torch.Tensor) -> torch.Tensor:
        """Store the states (T, H) in `dtype`; returns them as stored (what a later `get` gives)."""
        states = states.to(self.dtype).contiguous()
        if self.directory is None:
            # a copy: `states` is usually a slice of the whole padded batch (M, T, H), which a view would keep alive
            # (and the store's size cap would not count)
            states = states.clone()
            if isinstance(self.memory, MemoryStore):
                self.memory.add(key, states)
            else:
                self.memory[key] = states
            return states
        code, _ = _DTYPES[self.dtype]
        payload = states.cpu().numpy().tobytes()
        header = _HEADER.pack(MAGIC, key, hashlib.sha256(payload).digest(), *states.shape, code)
        path = self.directory / f"{key.hex()}.bin"
        # not fsync'd: a damaged entry fails its checksum and is rebuilt. A killed run leaves a stray KEY.*.tmp file
        # (`remove_stale_writes`), never a half-written entry
        atomic_write_bytes(path, header + payload, durable=False, temp_prefix=f"{key.hex()}.")
        return states

    def nbytes(self) -> int:
        if self.directory is None:
            return sum(t.numel() * t.element_size() for t in self.memory.values())
        return sum(p.stat().st_size for p in self.directory.glob("*.bin"))  # all the directory's caches

    def states(self, model, input_ids: list[list[int]], token_type_ids, pad_id: int,
               max_length: int) -> list[torch.Tensor]:
        """Frozen-part outputs (T_i, H) of the sequences, in fp32; the missing ones computed in one padded batch."""
        keys = [self.key(max_length, ids, tt) for ids, tt in
                zip(input_ids, token_type_ids if token_type_ids is not None else [None] * len(input_ids))]
        found = {k: self.get(k) for k in keys}
        missing = [keys.index(k) for k, s in found.items() if s is None]  # one per distinct sequence
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        self._compute(model, [input_ids[i] for i in missing], [keys[i] for i in missing], found,
                      [token_type_ids[i] for i in missing] if token_type_ids is not None else None, pad_id)
        return [found[k].float() for k in keys]

    def _compute(self, model, input_ids: list[list[int]], keys: list[bytes], found: dict, token_type_ids,
                 pad_id: int) -> None:
        """The frozen part on these sequences (one padded batch), stored under `keys` and into `found`."""
        from ser.models import collate

        if not input_ids:
            return
        device = next(model.parameters()).device
        # fp32 whatever the caller's autocast (bf16 scoring, mixed-precision training): the key holds no precision
        with torch.autocast(device.type, enabled=False):
            batch = collate(input_ids, token_type_ids, pad_id)
            hidden = forward_bottom(model, {k: v.to(device) for k, v in batch.items()})  # (M, T, H)
        for j, key in enumerate(keys):
            found[key] = self.put(key, hidden[j, : len(input_ids[j])].float().cpu())

    def rewards(self, model, input_ids: list[list[int]], token_type_ids, pad_id: int, max_length: int) -> torch.Tensor:
        """Rewards (B,) of the sequences: cached frozen states, right-padded, through `forward_top`."""
        states = self.states(model, input_ids, token_type_ids, pad_id, max_length)
        device = next(model.parameters()).device
        width = max(s.shape[0] for s in states)
        hidden = torch.zeros(len(states), width, states[0].shape[1], device=device)  # (B, T, H)
        mask = torch.zeros(len(states), width, dtype=torch.long, device=device)
        for i, s in enumerate(states):
            hidden[i, : s.shape[0]] = s.to(device)
            mask[i, : s.shape[0]] = 1
        return forward_top(model, hidden, mask)

    def pair_rewards(self, model, ids_a: list[list[int]], ids_b: list[list[int]], prompt_lengths: list[int],
                     pad_id: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_a, r_b), each (B,), of causal-RM pairs sharing their prompt (`ser.models.encode_pairs`; one prompt
        length per pair), each run as one packed [prompt, a, b] row (`ser.models.pack_pairs`) through the top N
        layers. A pair with both sequences missing runs the frozen part packed too, once per pair, and its two
        sequences are stored under the same keys as `states` stores them (a's states are the row's first len(a)
        positions, b's the prompt's followed by b's answer; equal to their own forward up to float rounding); a
        sequence missing alone (its partner cached, or a and b identical) runs on its own."""
        from ser.models import pack_pairs

        if not ids_a:
            return torch.zeros(0), torch.zeros(0)
        keys_a, keys_b = ([self.key(max_length, ids, None) for ids in seqs] for seqs in (ids_a, ids_b))
        found = {k: self.get(k) for k in keys_a + keys_b}
        missing = [k for k, s in found.items() if s is None]  # distinct
        self.hits += 2 * len(ids_a) - len(missing)
        self.misses += len(missing)
        both, claimed = [], set()  # pairs to run packed: each missing sequence computed once
        for i, (ka, kb) in enumerate(zip(keys_a, keys_b)):
            if ka != kb and found[ka] is None and found[kb] is None and not {ka, kb} & claimed:
                both.append(i)
                claimed |= {ka, kb}
        device = next(model.parameters()).device
        if both:
            packed = pack_pairs([ids_a[i] for i in both], [ids_b[i] for i in both],
                                [prompt_lengths[i] for i in both], pad_id)
            with torch.autocast(device.type, enabled=False):  # fp32, as `states` computes them
                hidden = forward_bottom(model, {k: v.to(device) for k, v in packed.items()}).float().cpu()
            for j, i in enumerate(both):
                n_a, p = len(ids_a[i]), prompt_lengths[i]
                n_b = len(ids_b[i]) - p
                found[keys_a[i]] = self.put(keys_a[i], hidden[j, :n_a])
                found[keys_b[i]] = self.put(keys_b[i], torch.cat([hidden[j, :p], hidden[j, n_a : n_a + n_b]]))
        alone = {k: ids for k, ids in zip(keys_a + keys_b, ids_a + ids_b) if found[k] is None}
        self._compute(model, list(alone.values()), list(alone), found, None, pad_id)
        batch = pack_pairs(ids_a, ids_b, prompt_lengths, pad_id)
        hidden = torch.zeros(*batch["input_ids"].shape, found[keys_a[0]].shape[1])  # (B, T, H)
        for i, p in zip(range(len(ids_a)), prompt_lengths):
            a, b = found[keys_a[i]].float(), found[keys_b[i]].float()[p:]
            hidden[i, : len(a)], hidden[i, len(a) : len(a) + len(b)] = a, b
        batch = {k: v.to(device) for k, v in batch.items()}
        return forward_top_packed(model, hidden.to(device), batch)


STALE_SECONDS = 24 * 3600  # a temporary entry file this old belongs to no live writer (one entry takes seconds)


def remove_stale_writes(directory: Path) -> None:
    """Delete the temporary files (`KEY.*.tmp`) that killed writers left in a cache directory more than a day
    ago; younger ones may belong to a process writing now (a cache directory can be shared)."""
    now = time.time()
    for p in directory.glob("*.tmp"):
        try:
            if now - p.stat().st_mtime > STALE_SECONDS:
                p.unlink()
        except FileNotFoundError:  # another process removed or renamed it first
            pass


def _decode(data: bytes, key: bytes, want: int) -> torch.Tensor | None:
    """The states (T, H) of an entry file, or None if it is truncated, corrupt, another key's, or stored in another
    dtype than the reading cache's (`want`, a `_DTYPES` code: an fp32 cache never reads fp16-rounded states)."""
    if len(data) < _HEADER.size:
        return None
    magic, stored_key, digest, t, h, code = _HEADER.unpack_from(data)
    np_dtype = next((d for c, d in _DTYPES.values() if c == code), None)
    payload = data[_HEADER.size :]
    if (magic != MAGIC or stored_key != key or code != want or np_dtype is None
            or len(payload) != t * h * np.dtype(np_dtype).itemsize or hashlib.sha256(payload).digest() != digest):
        return None
    return torch.from_numpy(np.frombuffer(payload, dtype=np_dtype).reshape(t, h).copy())


def backbone_identity(model, tokenizer) -> bytes:
    """sha256 of what the frozen part's output depends on: the model config (less its provenance), N, the frozen
    weights (names and bytes) and the tokenizer's vocabulary (~0.2 s for MiniLM's 19M frozen parameters)."""
    # where the weights came from and which class saved them do not change what the frozen part computes
    skip = ("_name_or_path", "transformers_version", "architectures")
    config = {k: v for k, v in model.config.to_dict().items() if k not in skip}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(f"trainable_layers={model.ser_trainable_layers}".encode())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.digest()


# The process's in-memory store: every RM with the same frozen part (the same backbone, N, vocabulary) reads the
# same entries, so an SER run's iterations, its pool scoring, calibration and evaluation, and the runs of one
# `ser experiment` or `ser curve`, compute each text's frozen states once. Keys carry the backbone identity, so
# entries of other backbones or N never mix. About 0.27 GiB per 1,000 pairs for MiniLM at 128 tokens (fp32);
# capped at $SER_FROZEN_CACHE_GIB (default 8 GiB), past which `model.frozen_cache` (a directory) is the remedy.
class MemoryStore(dict):
    """An in-memory store of frozen states with a size cap: past `limit_gib`, new states are computed each time
    they are needed instead of kept (with one warning naming the remedy: a cache directory)."""

    def __init__(self, limit_gib: float):
        super().__init__()
        self.limit, self.nbytes, self.warned = limit_gib * 2**30, 0, False

    def set_limit(self, limit_gib: float) -> None:
        self.limit = limit_gib * 2**30

    def add(self, key: bytes, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if self.nbytes + size > self.limit:
            if not self.warned:
                log.warning("the in-memory frozen-layer cache reached its %.1f GiB cap (SER_FROZEN_CACHE_GIB); "
                            "further texts are not cached: set model.frozen_cache to a directory to cache them all",
                            self.limit / 2**30)
                self.warned = True
            return
        self[key] = states
        self.nbytes += size

    def clear(self) -> None:
        super().clear()
        self.nbytes, self.warned = 0, False


SHARED_MEMORY = MemoryStore(8.0)  # its cap set from the environment when a cache uses it (`memory_cap_gib`)


def memory_cap_gib() -> float:
    """$SER_FROZEN_CACHE_GIB (default 8) in GiB. Raises UserError unless it is a finite number >= 0."""
    value = os.environ.get("SER_FROZEN_CACHE_GIB", "8")
    try:
        gib = float(value)
    except ValueError:
        gib = float("nan")
    if not math.isfinite(gib) or gib < 0:
        raise UserError(f"SER_FROZEN_CACHE_GIB={shown(value)}: expected a number of GiB >= 0 (e.g. 8 or 0.5)")
    return gib


def shared_cache(model, tokenizer, directory: str | Path | None = None) -> FrozenCache:
    """A `FrozenCache` for `model` over the process-wide store `SHARED_MEMORY`, or over files in `directory`
    (then also shared with later processes: a resumed run, another run given the same directory).
    Raises UserError on a bad $SER_FROZEN_CACHE_GIB (`memory_cap_gib`)."""
    if not directory:
        SHARED_MEMORY.set_limit(memory_cap_gib())
    return FrozenCache(model, tokenizer, directory=directory, memory=None if directory else SHARED_MEMORY)


def attach_cache(model, cache: FrozenCache | None) -> None:
    """Make training and scoring of `model` go through `cache` (`cache_of`); None detaches it."""
    model.ser_frozen_cache = cache


def cache_of(model) -> FrozenCache | None:
    """The cache attached to a reward model (inside a DDP `.module` wrapper too), or None."""
    return getattr(getattr(model, "module", model), "ser_frozen_cache", None)
