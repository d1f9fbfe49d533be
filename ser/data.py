"""Data: load preference pairs from the usual formats, validate them, split them deterministically.

Every format becomes one canonical record: `Pair` (prompt, chosen, rejected) for human-labelled data and
`UnlabelledPair` (prompt, answer_a, answer_b) for the pool. A pair's id hashes the prompt and the *unordered*
answers, so it does not depend on the label: hiding or flipping labels never changes ids, splits or answer
order, and an id cannot be used to recover a hidden label. Bad input raises
`UserError("file:record: problem")` (record = 1-based line for .jsonl/.csv, `record N` = 0-based index for
.json lists, parquet and Hub datasets); records that are legitimately unusable are dropped and counted in the log.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ser.errors import UserError, where

log = logging.getLogger(__name__)

ASSISTANT = "\n\nAssistant:"
# name -> (file under the data dir, splits (first = default), Hub dataset id, Hub data_dir).
# The local HH-RLHF files are the test splits; the full train splits live on the Hub.
KNOWN = {
    **{f"hh-rlhf:{d}": (f"hh-rlhf/{d}/{{split}}.jsonl.gz", ("test", "train"), "Anthropic/hh-rlhf", d)
       for d in ("helpful-base", "harmless-base", "helpful-online")},
    "ultrafeedback": ("ultrafeedback-binarized-subset/{split}_clean.jsonl", ("train", "eval"),
                      "trl-lib/ultrafeedback_binarized", None),
    "pandalm": ("pandalm/testset-v1.json", ("test",), "WeOpenML/PandaLM", None),
}
HUB_SPLIT = {"eval": "test"}  # trl-lib/ultrafeedback_binarized names its held-out split "test"
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".parquet")
COLUMNS = ("prompt", "chosen", "rejected", "answer_a", "answer_b", "label")  # what `columns=` may map to
ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}
FORMATS = ("HH-RLHF (chosen, rejected dialogues); TRL (prompt, chosen, rejected as strings or message lists); "
           "PandaLM (instruction, response1, response2, annotator1..3); prompt, answer_a, answer_b [, label]; "
           "or a column mapping (data.columns)")


@dataclass(frozen=True)
class Pair:
    id: str  # pair_id(prompt, chosen, rejected): independent of which answer is chosen
    prompt: str
    chosen: str
    rejected: str
    source: str  # the dataset name (e.g. "hh-rlhf:helpful-base") or the local file's stem


@dataclass(frozen=True)
class UnlabelledPair:
    id: str
    prompt: str
    answer_a: str
    answer_b: str
    source: str


@dataclass
class Split:
    seed: list[Pair]  # the human-labelled fraction
    pool: list[Pair]  # labels hidden by `hide_labels` before SER sees them
    test: list[Pair]


def pair_id(prompt: str, a: str, b: str) -> str:
    """sha1 of the prompt and the sorted answers, 16 hex chars. Label-invariant on purpose: an id that hashed
    (prompt, chosen, rejected) in order would leak the hidden label of every pool pair (hash both orders)."""
    x, y = sorted((a, b))
    return hashlib.sha1("\x1f".join((prompt, x, y)).encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------- resolving specs


def data_dirs() -> list[Path]:
    """Where known datasets are looked for: $SER_DATA_DIR, then ../shared/data beside the repository."""
    dirs = [Path(os.environ["SER_DATA_DIR"])] if os.environ.get("SER_DATA_DIR") else []
    return dirs + [Path(__file__).resolve().parents[2] / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def _known(spec: str) -> tuple[str, str] | None:
    """`hh-rlhf:helpful-base[:train]` -> (name, split); None if the spec is not a known dataset."""
    name, split = (spec, None) if spec in KNOWN else (spec.rsplit(":", 1) + [None])[:2]
    if name not in KNOWN:
        return None
    splits = KNOWN[name][1]
    if split is not None and split not in splits:
        raise UserError(f"{spec}: unknown split '{split}' of {name} (known: {', '.join(splits)})")
    return name, split or splits[0]


def _locate(spec: str) -> tuple[str, dict | None]:
    """(local path, None) or (Hub dataset id, load_dataset keyword arguments)."""
    path = Path(spec).expanduser()
    if path.exists():
        return str(path), None
    known = _known(spec)
    if known:
        name, split = known
        rel, _, hub_id, data_dir = KNOWN[name]
        rel = rel.format(split=split)
        for d in data_dirs():
            if (d / rel).is_file():
                return str(d / rel), None
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            looked = ", ".join(str(d / rel) for d in data_dirs())
            raise UserError(f"{spec}: not found locally (looked at {looked}) and HF_HUB_OFFLINE=1 forbids the Hub; "
                            f"set SER_DATA_DIR or pass a file path")
        return hub_id, {"data_dir": data_dir, "split": HUB_SPLIT.get(split, split)}
    if spec.lower().endswith(SUFFIXES) or spec.startswith(("/", ".", "~")):
        raise UserError(f"{spec}: no such file")
    m = re.fullmatch(r"([\w.-]+/[\w.-]+)(?::([\w.-]+))?", spec)
    if m:  # owner/name[:split]; with HF_HUB_OFFLINE=1 `datasets` can still use its cache
        return m[1], {"split": m[2] or "train"}
    what = "unknown dataset" if ":" in spec else "no such file or dataset"
    raise UserError(f"{spec}: {what} '{spec}'; known: {', '.join(KNOWN)} (with :test/:train, ultrafeedback "
                    f"with :train/:eval), a local .jsonl/.jsonl.gz/.json/.csv/.parquet file, or a Hub id owner/name")


def resolve_data_spec(spec: str) -> str:
    """A known dataset name, a path or a Hub id -> the local file to read, or the Hub dataset id to load."""
    return _locate(spec)[0]


# ---------------------------------------------------------------- reading records


def _decode(raw: bytes, path, line=None) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate the BOM some editors write
    except UnicodeDecodeError as e:
        n = line if line is not None else raw[: e.start].count(b"\n") + 1
        raise UserError(f"{where(path, n)}: invalid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def _json_lines(lines, path):
    """Yield (line number, value) from JSON Lines, skipping blank lines."""
    for n, raw in enumerate(lines, 1):
        text = _decode(raw, path, n) if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            yield n, json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where(path, n)}: malformed JSON ({e.msg})") from None


def _read_records(path: str):
    """Yield (record, value) from a local file. JSON Lines are streamed; other formats are read whole."""
    p = Path(path)
    name = p.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    name = name.removesuffix(".gz")
    try:
        if name.endswith(".jsonl"):
            with opener(p, "rb") as f:  # binary: split on b"\n" only (JSON strings may hold U+2028)
                yield from _json_lines(f, p)
        elif name.endswith(".json"):
            with opener(p, "rb") as f:
                text = _decode(f.read(), p)
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":
                    raise UserError(f"{where(p, e.lineno)}: malformed JSON ({e.msg})") from None
                data = None  # several values: JSON Lines saved as .json
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if isinstance(data, list):
                yield from ((f"record {i}", rec) for i, rec in enumerate(data))
            else:
                yield from _json_lines(text.split("\n"), p)
        elif name.endswith(".csv"):
            with opener(p, "rb") as f:
                text = _decode(f.read(), p)
            csv.field_size_limit(sys.maxsize)  # answers are often longer than csv's 128 KiB default
            reader = csv.DictReader(io.StringIO(text, newline=""))
            while True:
                start = reader.line_num + 1  # a quoted field may span lines: name the line the row starts on
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise UserError(f"{where(p, start)}: malformed CSV ({e})") from None
                yield start, row
        elif name.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise UserError(f"{p}: reading parquet needs pyarrow (pip install pyarrow), or convert the file "
                                f"to .jsonl") from None
            try:
                rows = pq.read_table(p).to_pylist()
            except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family for corrupt files
                raise UserError(f"{p}: not a readable parquet file ({type(e).__name__}: {_first_line(e)})") from None
            yield from ((f"record {i}", rec) for i, rec in enumerate(rows))
        else:
            raise UserError(f"{p}: unsupported file type (use {', '.join(SUFFIXES)})")
    except (EOFError, gzip.BadGzipFile, zlib.error):
        raise UserError(f"{p}: truncated or corrupt gzip file") from None
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{p}: is a directory, expected a data file") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror or e})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _hub_records(spec: str, hub_id: str, kwargs: dict):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{spec}: not a local file; loading {hub_id} from the Hugging Face Hub needs the `datasets` "
                        f"package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(hub_id, **{k: v for k, v in kwargs.items() if v is not None})
    except Exception as e:  # network, auth, missing dataset or split: all are the user's to fix
        raise UserError(f"{spec}: could not load {hub_id} from the Hub "
                        f"({type(e).__name__}: {_first_line(e)})") from None
    yield from ((f"record {i}", rec) for i, rec in enumerate(ds))


# ---------------------------------------------------------------- formats


def _kind(v) -> str:
    if v is None:
        return "null"
    return {list: "a list", dict: "an object", str: "a string", bool: "a boolean", int: "an int",
            float: "a float"}.get(type(v), type(v).__name__)


def _text(rec: dict, key: str, loc: str) -> str:
    if key not in rec:
        raise UserError(f"{loc}: missing field '{key}' (fields: {', '.join(map(str, rec))})")
    if not isinstance(rec[key], str):
        raise UserError(f"{loc}: field '{key}' is {_kind(rec[key])}, expected a string")
    return rec[key]


def _messages(rec: dict, key: str, loc: str) -> list[dict]:
    msgs = rec.get(key)
    if key not in rec:
        raise UserError(f"{loc}: missing field '{key}'")
    if not isinstance(msgs, list):
        raise UserError(f"{loc}: field '{key}' is {_kind(msgs)}, expected a list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{loc}: message {i} of '{key}' is not an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{loc}: unknown role {m['role']!r} in '{key}' (expected system, user or assistant)")
        if not isinstance(m["content"], str):
            raise UserError(f"{loc}: message {i} of '{key}' has content of {_kind(m['content'])}, expected a string")
    return msgs


def _render(messages: list[dict], chat_template) -> str:
    """The prompt as the model will see it: the caller's chat template, else HH-RLHF-style plain text."""
    if chat_template is not None:
        return chat_template(messages)
    return "".join(f"\n\n{ROLES[m['role']]}: {m['content']}" for m in messages) + ASSISTANT


def _detect(rec: dict, loc: str) -> str:
    """The file's format, from the keys of its first record."""
    keys = set(rec)
    if {"instruction", "response1", "response2"} <= keys:
        return "pandalm"
    if {"answer_a", "answer_b"} <= keys:
        return "choice" if "label" in keys else "unlabelled"
    if {"chosen", "rejected"} <= keys:
        if isinstance(rec["chosen"], list):
            return "chat"
        if "prompt" in keys:
            return "trl"
        if isinstance(rec["chosen"], str) and ASSISTANT in rec["chosen"]:
            return "hh"
        raise UserError(f"{loc}: 'chosen'/'rejected' without a 'prompt' field and not HH-RLHF dialogues "
                        f"(no '\\n\\nAssistant:' turn)")
    raise UserError(f"{loc}: unrecognised record format (fields: {', '.join(map(str, rec)) or 'none'}); "
                    f"supported: {FORMATS}")


def _split_hh(chosen: str, rejected: str, loc: str) -> tuple[str, str, str]:
    """HH-RLHF: the prompt is the shared dialogue up to the last '\\n\\nAssistant:'. A few answers contain a
    hallucinated '\\n\\nAssistant:' or 'Human:' turn of their own, so when the two last turns disagree the
    prompt is the longest common prefix that ends at an '\\n\\nAssistant:' boundary."""
    kc, kr = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if kc < 0 or kr < 0 or chosen[:kc] != rejected[:kr]:
        kc = chosen.rfind(ASSISTANT, 0, len(os.path.commonprefix([chosen, rejected])))
        if kc < 0:
            raise UserError(f"{loc}: chosen and rejected dialogues do not share a prefix ending in '\\n\\nAssistant:'")
    cut = kc + len(ASSISTANT)
    # The answers start with the space after "Assistant:"; removing it makes prompt + " " + answer the original.
    return chosen[:cut], chosen[cut:].lstrip(), rejected[cut:].lstrip()


def _pandalm(rec: dict, loc: str):
    """(prompt, response1, response2, label) by the annotators' majority, or a drop reason."""
    votes = []
    for k in ("annotator1", "annotator2", "annotator3"):
        v = rec.get(k)
        if k not in rec or isinstance(v, bool) or not isinstance(v, int) or v not in (0, 1, 2):
            raise UserError(f"{loc}: '{k}' must be 0 (tie), 1 or 2 (better response), got {v!r}")
        votes.append(v)
    winner, count = Counter(votes).most_common(1)[0]
    if count < 2:
        return "no majority among annotators"
    if winner == 0:
        return "annotators' majority is a tie"
    prompt = _text(rec, "instruction", loc)
    if rec.get("input"):
        prompt += "\n\n" + _text(rec, "input", loc)
    # The released PandaLM test set stores a few one-word answers as JSON booleans (true for "True").
    r1, r2 = (str(rec[k]) if isinstance(rec.get(k), (bool, int, float)) else _text(rec, k, loc)
              for k in ("response1", "response2"))
    return prompt, r1, r2, winner - 1


def _chat(rec: dict, loc: str, chat_template):
    """TRL conversational: the answers are the final assistant messages; the prompt is `prompt` (messages)
    followed by the messages chosen and rejected share, or that shared prefix alone."""
    c, r = _messages(rec, "chosen", loc), _messages(rec, "rejected", loc)
    for key, msgs in (("chosen", c), ("rejected", r)):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise UserError(f"{loc}: '{key}' must end with an assistant message")
    if c[:-1] != r[:-1]:
        raise UserError(f"{loc}: 'chosen' and 'rejected' differ before their final assistant message")
    prompt = rec.get("prompt")
    if isinstance(prompt, list):
        msgs = _messages(rec, "prompt", loc) + c[:-1]
    elif c[:-1]:  # UltraFeedback raw also has `prompt` as a string: the user turn repeats it
        msgs = c[:-1]
    elif isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    else:
        raise UserError(f"{loc}: no prompt: 'chosen' holds only the answer and there is no 'prompt' field")
    text = _render(msgs, chat_template)
    if not isinstance(text, str):
        raise UserError(f"{loc}: chat_template returned {_kind(text)}, expected a string")
    return text, c[-1]["content"], r[-1]["content"], 0


def _label(v, loc: str) -> int:
    """A mapped label as an int 0, 1 or 2 (CSV gives strings, parquet may give floats)."""
    if isinstance(v, str) and v.strip() in ("0", "1", "2"):
        return int(v)
    if isinstance(v, float) and v in (0.0, 1.0, 2.0):
        return int(v)
    if isinstance(v, bool) or v not in (0, 1, 2):
        raise UserError(f"{loc}: 'label' must be 0 or 1 (answer_a / answer_b is better; 1 or 2 also accepted), "
                        f"got {v!r}")
    return v


def _parse(fmt: str, rec: dict, loc: str, chat_template):
    """One record -> (prompt, answer_a, answer_b, label) with label 0 = answer_a is better, 1 = answer_b,
    None = unlabelled, a raw 0/1/2 for `choice` (the scheme is decided per file); or a drop reason (str)."""
    if fmt == "hh":
        return (*_split_hh(_text(rec, "chosen", loc), _text(rec, "rejected", loc), loc), 0)
    if fmt == "trl":
        return _text(rec, "prompt", loc), _text(rec, "chosen", loc), _text(rec, "rejected", loc), 0
    if fmt == "chat":
        return _chat(rec, loc, chat_template)
    if fmt == "pandalm":
        return _pandalm(rec, loc)
    a, b = _text(rec, "answer_a", loc), _text(rec, "answer_b", loc)
    if fmt == "unlabelled":
        return _text(rec, "prompt", loc), a, b, None
    if "label" not in rec:
        raise UserError(f"{loc}: missing field 'label'")
    return _text(rec, "prompt", loc), a, b, _label(rec["label"], loc)


def _mapped(rec: dict, columns: dict, loc: str) -> dict:
    """The record under our field names; fields the mapping does not name keep their own name."""
    out = {k: rec[k] for k in COLUMNS if k in rec and k not in columns}
    for ours, theirs in columns.items():
        if theirs not in rec:
            raise UserError(f"{loc}: missing column '{theirs}' (mapped to '{ours}'; columns: "
                            f"{', '.join(map(str, rec))})")
        out[ours] = rec[theirs]
    return out


# ---------------------------------------------------------------- loading


def _load(spec: str, columns, limit, chat_template, want: str) -> list:
    path, hub = _locate(spec)
    if columns:
        unknown = sorted(set(columns) - set(COLUMNS))
        if unknown:
            raise UserError(f"{path}: column mapping names unknown field(s) {', '.join(unknown)} "
                            f"(expected some of {', '.join(COLUMNS)})")
    records = _hub_records(spec, path, hub) if hub is not None else _read_records(path)
    known = _known(spec)
    if known:  # "ultrafeedback" and "ultrafeedback:train" are one source in per-source metrics
        source = known[0] if known[1] == KNOWN[known[0]][1][0] else ":".join(known)
    else:
        source = spec if hub is not None else Path(path).name.split(".")[0]
    fmt, total, drops, seen, rows = None, 0, Counter(), {}, []  # seen: id -> the better answer (None: unknown)
    for rec_no, rec in records:
        total += 1
        loc = where(path, rec_no)
        if not isinstance(rec, dict):
            raise UserError(f"{loc}: expected a JSON object, got {_kind(rec)}")
        if columns:
            rec = _mapped(rec, columns, loc)
        if fmt is None:
            fmt = _detect(rec, loc)
            if fmt == "unlabelled" and want == "pair":
                raise UserError(f"{loc}: the file has no labels (prompt, answer_a, answer_b); load it as an "
                                f"unlabelled pool (data.pool)")
        row = _parse(fmt, rec, loc, chat_template)
        if isinstance(row, str):
            drops[row] += 1
            continue
        prompt, a, b, label = row
        names = "answer_a and answer_b" if label is None else "chosen and rejected"
        if not a.strip() or not b.strip():
            drops[f"empty {names.replace(' and ', ' or ')}"] += 1
            continue
        if a.strip() == b.strip():
            drops[f"identical {names}"] += 1
            continue
        pid = pair_id(prompt, a, b)
        better = None if label is None or fmt == "choice" else (a, b)[label]
        if pid in seen:  # PandaLM repeats identical outputs of different models; a flipped label is a conflict
            drops["duplicate" if seen[pid] == better else "duplicate with the opposite label"] += 1
            continue
        seen[pid] = better
        rows.append((pid, prompt, a, b, label))
        # A mapped 0/1/2 label is read to the end of the file: its scheme depends on every value.
        if limit is not None and len(rows) >= limit and fmt != "choice":
            break
    if total == 0:
        raise UserError(f"{path}: no records (empty file)")
    for reason, count in sorted(drops.items()):
        log.info("%s: dropped %d of %d pairs (%s)", source, count, total, reason)
    if not rows:
        raise UserError(f"{path}: no usable pairs (all {total} records dropped: "
                        f"{', '.join(f'{n} {r}' for r, n in drops.items())})")
    if fmt == "choice":
        # 0/1 = answer_a/answer_b is better; a file whose labels are only 1 and 2 means output 1/output 2.
        values = {r[4] for r in rows}
        if {0, 2} <= values:
            raise UserError(f"{path}: 'label' mixes 0 and 2; use 0/1 (answer_a/answer_b better) or 1/2")
        shift = 1 if 2 in values else 0
        rows = [(pid, p, a, b, lab - shift) for pid, p, a, b, lab in rows][:limit]
    out = []
    for pid, prompt, a, b, label in rows:
        if label is None:
            out.append(UnlabelledPair(pid, prompt, a, b, source))
            continue
        pair = Pair(pid, prompt, a, b, source) if label == 0 else Pair(pid, prompt, b, a, source)
        out.append(pair if want == "pair" else _unlabelled(pair))  # a pool from labelled data: labels dropped
    return out


def load_pairs(spec: str, *, columns: dict[str, str] | None = None, limit: int | None = None,
               chat_template=None) -> list[Pair]:
    """Human-labelled pairs from a known dataset name, a local file or a Hub id (see the module docstring).

    columns: our field -> the file's column, e.g. {"prompt": "q", "chosen": "good", "rejected": "bad"} or
      {"prompt": "input", "answer_a": "output_1", "answer_b": "output_2", "label": "label"} (label 0/1 =
      answer_a/answer_b is better; a file whose labels are only 1 and 2 means output_1/output_2).
    limit: the first `limit` usable pairs. chat_template: `messages -> str` for conversational prompts.
    Dropped, with a logged count: empty or identical answers, duplicates, PandaLM ties."""
    return _load(spec, columns, limit, chat_template, "pair")


def load_unlabelled(spec: str, *, columns: dict[str, str] | None = None, limit: int | None = None,
                    chat_template=None) -> list[UnlabelledPair]:
    """A pool: a file of (prompt, answer_a, answer_b), or any labelled data with its labels discarded."""
    return _load(spec, columns, limit, chat_template, "unlabelled")


def dedupe(pairs: list) -> list:
    """Keep the first pair of each id (same prompt and answers), logging how many were dropped."""
    first, out, flipped = {}, [], 0
    for p in pairs:
        if p.id in first:
            flipped += isinstance(p, Pair) and p.chosen != first[p.id].chosen
            continue
        first[p.id] = p
        out.append(p)
    if len(out) < len(pairs):
        log.warning("dropped %d of %d pairs as duplicates (same prompt and answers; %d with the opposite label)",
                    len(pairs) - len(out), len(pairs), flipped)
    return out


# ---------------------------------------------------------------- the label firewall and splits


def _unlabelled(p: Pair) -> UnlabelledPair:
    """Answer order from the texts and the id only, never from the label: sorted, then swapped by a hash bit."""
    x, y = sorted((p.chosen, p.rejected))
    swap = hashlib.sha1(f"order:{p.id}".encode()).digest()[0] & 1
    return UnlabelledPair(p.id, p.prompt, *((y, x) if swap else (x, y)), p.source)


def hide_labels(pairs: list[Pair]) -> tuple[list[UnlabelledPair], dict[str, int]]:
    """The firewall: the unlabelled view of labelled pairs and, kept apart for auditing pseudo-labels only,
    id -> 0 if answer_a is the human-chosen answer else 1."""
    pool = [_unlabelled(p) for p in pairs]
    return pool, {u.id: 0 if u.answer_a == p.chosen else 1 for u, p in zip(pool, pairs)}


def _count(size, n: int, name: str) -> int:
    """A float in [0, 1] is a fraction of all n pairs; an int is a count."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise UserError(f"split: '{name}' must be a fraction (0.15) or a count (200), got {size!r}")
    if isinstance(size, float):
        if not 0 <= size <= 1:
            raise UserError(f"split: '{name}' as a fraction must be in [0, 1], got {size}")
        return int(size * n + 0.5)
    if size < 0:
        raise UserError(f"split: '{name}' must be >= 0, got {size}")
    return size


def split_pairs(pairs: list[Pair], *, seed_size: float | int, test_size: float | int,
                pool_size: float | int | None = None, seed: int = 0) -> Split:
    """test, seed and pool by fraction (of all pairs) or count. Pairs are ordered by sha1(f"{seed}:{id}"), so
    the split is deterministic and independent of the input order; test is taken first, then seed, then pool
    (the rest, or `pool_size` of it)."""
    pairs = dedupe(pairs)
    n = len(pairs)
    n_test, n_seed = _count(test_size, n, "test_size"), _count(seed_size, n, "seed_size")
    n_pool = max(n - n_test - n_seed, 0) if pool_size is None else _count(pool_size, n, "pool_size")
    if n_test + n_seed + n_pool > n:
        raise UserError(f"split: asked for {n_test} test + {n_seed} seed + {n_pool} pool = "
                        f"{n_test + n_seed + n_pool} pairs, but only {n} unique pairs exist")
    order = sorted(pairs, key=lambda p: hashlib.sha1(f"{seed}:{p.id}".encode()).hexdigest())
    return Split(seed=order[n_test:n_test + n_seed], pool=order[n_test + n_seed:n_test + n_seed + n_pool],
                 test=order[:n_test])
