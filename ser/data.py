"""Data: load preference pairs from the usual formats, validate them, split them deterministically.

One canonical record: `Pair` (prompt, chosen, rejected) for human-labelled data and `UnlabelledPair`
(prompt, answer_a, answer_b) for the pool. A pair's id hashes the prompt and the *unordered* answers, so it
does not depend on the label: hiding or flipping labels never changes ids, splits or answer order.
Bad input raises `UserError("file:record: problem")`; legitimately unusable records are dropped and counted.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ser.errors import UserError, shown, shown_name, where

log = logging.getLogger(__name__)

ASSISTANT = "\n\nAssistant:"
KNOWN = {  # name -> (path under the data dir, Hub dataset id, Hub data_dir)
    "hh-rlhf:helpful-base": ("hh-rlhf/helpful-base/{split}.jsonl.gz", "Anthropic/hh-rlhf", "helpful-base"),
    "hh-rlhf:harmless-base": ("hh-rlhf/harmless-base/{split}.jsonl.gz", "Anthropic/hh-rlhf", "harmless-base"),
    "hh-rlhf:helpful-online": ("hh-rlhf/helpful-online/{split}.jsonl.gz", "Anthropic/hh-rlhf", "helpful-online"),
    "ultrafeedback": ("ultrafeedback-binarized-subset/{split}_clean.jsonl", "trl-lib/ultrafeedback_binarized", None),
    "pandalm": ("pandalm/testset-v1.json", "WeOpenML/PandaLM", None),
}
DEFAULT_SPLIT = {"ultrafeedback": "train"}  # the local HH files are the test splits; UltraFeedback has both
# The Hub has no "eval" split: its held-out split is test (the local subset's train and eval files were both drawn
# from the Hub's 62,135-record train split, ../shared/data's data_report.md)
HUB_SPLIT = {("ultrafeedback", "eval"): "test"}
# A jsonl line (or a CSV field, in characters) longer than this is an error, not a record: real records are a few
# KB, and more text than any model's context means a corrupt or wrong file. Checked while reading: bounded memory.
MAX_RECORD_BYTES = 16 << 20
# A record's own id, carried into `ser score` output as `input_id` so it joins back: the first of these columns
# present (with a string or integer value; `_input_id`).
ID_COLUMNS = ("id", "sample_id", "example_id", "uid", "prompt_id")


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: str
    chosen: str
    rejected: str
    source: str


@dataclass(frozen=True)
class UnlabelledPair:
    id: str
    prompt: str
    answer_a: str
    answer_b: str
    source: str


@dataclass
class Loaded:
    """A data file as loaded: the usable pairs (deduplicated, in input order), where each came from, and the
    records left out. Record numbers are those of the error messages: the line of a .jsonl/.csv, the index in a
    .json/.parquet file or Hub dataset."""

    path: str
    pairs: list  # Pair | UnlabelledPair
    records: list[int]  # the record number of each pair
    input_ids: list  # each pair's own id (`ID_COLUMNS`), None where the record has none
    skipped: list[dict]  # one per record left out: {"record", "input_id" (if any), "reason"[, "duplicate_of"]}


@dataclass
class Split:
    seed: list[Pair]  # the human-labelled fraction
    pool: list[Pair]  # labels hidden by `hide_labels` before SER sees them
    test: list[Pair]
    n_pairs: int = 0  # the usable pairs the split was made of: what data.seed_size etc. take fractions of


def pair_id(prompt: str, a: str, b: str) -> str:
    """Label-invariant id: the same prompt and answers give the same id whichever answer is chosen."""
    x, y = sorted((a, b))
    return hashlib.sha1("\x1f".join((prompt, x, y)).encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------- resolving specs


def data_dirs() -> list[Path]:
    dirs = [Path(os.environ["SER_DATA_DIR"])] if os.environ.get("SER_DATA_DIR") else []
    found = dirs + [Path(__file__).resolve().parents[2] / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return list({p.resolve(): p for p in found}.values())  # one of each (the repository's parent is often the cwd's)


def local_path(spec: str) -> str | None:
    """The local file a data spec reads (a known name resolved), or None (a Hub dataset, or no such data)."""
    try:
        path = resolve_data_spec(spec)
    except UserError:
        return None
    return None if path.startswith("hub:") else path


def resolve_data_spec(spec: str) -> str:
    """A known name (`hh-rlhf:helpful-base[:train]`, `ultrafeedback[:eval]`, `pandalm`) -> a local file, else
    the spec itself when it is an existing file or a Hub dataset id. Raises UserError for a spec that names no
    data, or a path the file system refuses to look up (a name too long)."""
    try:
        return _resolve_data_spec(spec)
    except OSError as e:  # Path.exists raises these rather than answer False
        raise UserError(f"{shown(spec)}: cannot look up this data path ({e.strerror})") from None


def _resolve_data_spec(spec: str) -> str:
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    name, split = spec, None
    if spec not in KNOWN and spec.rsplit(":", 1)[0] in KNOWN:
        name, split = spec.rsplit(":", 1)
    if name in KNOWN:
        default = DEFAULT_SPLIT.get(name, "test")
        if split not in (None, default) and "{split}" not in KNOWN[name][0]:  # pandalm: one file, its test set
            raise UserError(f"{spec}: {name} has only the split '{default}'")
        rel = KNOWN[name][0].format(split=split or default)
        for d in data_dirs():
            if (d / rel).exists():
                return str(d / rel)
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise UserError(f"{spec}: dataset not found locally ({rel} under {', '.join(map(str, data_dirs()))}) "
                            f"and HF_HUB_OFFLINE=1")
        return f"hub:{spec}"
    files = (".jsonl", ".gz", ".json", ".csv", ".parquet")
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", spec) and not spec.endswith(files) and not Path(spec).parent.exists():
        return f"hub:{spec}"  # owner/name[:split] on the Hugging Face Hub
    if ":" in spec or spec.endswith(files):
        kind = "no such file" if "." in Path(spec).name and ":" not in spec else "unknown dataset"
        raise UserError(f"{spec}: {kind}; known datasets: {', '.join(KNOWN)}")
    raise UserError(f"{spec}: no such file or dataset; known datasets: {', '.join(KNOWN)}")


# ---------------------------------------------------------------- reading records


def _first_clause(e: Exception) -> str:
    """An exception's message up to its first ';' (Python's advice to the programmer dropped)."""
    return str(e).split(";")[0].strip()


class _DuplicateKey(ValueError):
    """A JSON object names one key twice (json.loads would keep the last value silently)."""


def _unique_keys(pairs: list) -> dict:
    """json.loads' object_pairs_hook: the object as a dict, or _DuplicateKey naming the repeated key."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _json_records(data):
    """A .json file's records: the file's list, or the list under "data" (`{"data": [...]}`); else `data` as is."""
    return data["data"] if isinstance(data, dict) and isinstance(data.get("data"), list) else data


def _duplicate_key_record(text: str) -> int | None:
    """The index of the record of a .json list (or {"data": [...]}) holding the object that _unique_keys raised on
    (the first one the parser closes with a key twice), None if that object is outside the list or the text cannot
    be parsed again. Parses again with a hook that marks such objects instead of raising (errors only)."""
    marks = []

    def marking(pairs):
        if len({k for k, _ in pairs}) < len(pairs):
            marks.append(object())
            return marks[-1]
        return dict(pairs)

    def holds(x, mark) -> bool:  # iterative: a record nested deeper than Python's recursion limit is still searched
        stack = [x]
        while stack:
            y = stack.pop()
            if y is mark:
                return True
            stack.extend(y.values() if isinstance(y, dict) else y if isinstance(y, list) else ())
        return False

    try:
        data = _json_records(json.loads(text, object_pairs_hook=marking))
    except (ValueError, RecursionError):  # malformed later in the file: the message names the file alone
        return None
    if not marks or not isinstance(data, list):
        return None
    return next((i for i, rec in enumerate(data) if holds(rec, marks[0])), None)


def _read_records(path: str):
    """Yield (record number, dict) from a local file; record = line for jsonl/csv, index for json/parquet."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected a data file")
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(p, "rb") as f:
                for n, raw in enumerate(iter(lambda: f.readline(MAX_RECORD_BYTES + 1), b""), 1):
                    if len(raw.rstrip(b"\r\n")) > MAX_RECORD_BYTES:
                        raise UserError(f"{where(p, n)}: line longer than {MAX_RECORD_BYTES >> 20} MiB, too long "
                                        f"for one record")
                    if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM, before the blank-line check
                        raw = raw[3:]
                    if not raw.strip():
                        continue
                    try:
                        text = raw.decode("utf-8")
                        rec = json.loads(text, object_pairs_hook=_unique_keys)
                    except _DuplicateKey as e:
                        raise UserError(f"{where(p, n)}: key {shown(e.args[0])} appears twice in the record") from None
                    except UnicodeDecodeError:
                        raise UserError(f"{where(p, n)}: invalid UTF-8") from None
                    except json.JSONDecodeError as e:
                        raise UserError(f"{where(p, n)}: malformed JSON ({e.msg})") from None
                    except RecursionError:
                        raise UserError(f"{where(p, n)}: JSON nested too deeply") from None
                    except ValueError as e:  # e.g. an integer of over 4,300 digits (Python's conversion limit)
                        raise UserError(f"{where(p, n)}: unreadable JSON value ({_first_clause(e)})") from None
                    yield n, rec
        elif name.endswith(".json"):
            try:
                text = p.read_bytes().decode("utf-8-sig")
                data = json.loads(text, object_pairs_hook=_unique_keys)
            except _DuplicateKey as e:
                i = _duplicate_key_record(text)
                raise UserError(f"{where(p, i)}: key {shown(e.args[0])} appears twice in "
                                f"{'one object' if i is None else 'the record'}") from None
            except UnicodeDecodeError:
                raise UserError(f"{p}: invalid UTF-8") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{p}: line {e.lineno}: malformed JSON ({e.msg})") from None  # p:N is a record
            except RecursionError:
                raise UserError(f"{p}: JSON nested too deeply") from None
            except ValueError as e:
                raise UserError(f"{p}: unreadable JSON value ({_first_clause(e)})") from None
            data = _json_records(data)
            if not isinstance(data, list):
                raise UserError(f"{p}: expected a JSON list of records (or {{\"data\": [...]}})")
            yield from enumerate(data)
        elif name.endswith(".csv"):
            try:
                text = p.read_bytes().decode("utf-8-sig")  # "-sig": drop the BOM that Excel writes
            except UnicodeDecodeError:
                raise UserError(f"{p}: invalid UTF-8") from None
            csv.field_size_limit(MAX_RECORD_BYTES)  # the default (128K characters) is below long-context records
            rows = csv.reader(io.StringIO(text))
            try:
                header = next((row for row in rows if row), [])  # blank lines before the header: skipped
                while header and header[-1] == "":  # trailing commas, as in the rows
                    header = header[:-1]
                if len(set(header)) < len(header):
                    dup = next(h for h in header if header.count(h) > 1)
                    raise UserError(f"{where(p, rows.line_num)}: the header names column '{dup}' twice")
                for values in rows:
                    n = rows.line_num  # the file line where the row ends (quoted answers may span lines)
                    if not values:
                        continue
                    while len(values) > len(header) and values[-1] == "":  # trailing commas, as Excel writes
                        values = values[:-1]
                    if len(values) != len(header):  # csv.DictReader would drop or pad silently
                        raise UserError(f"{where(p, n)}: row has {len(values)} fields, the header has {len(header)}")
                    yield n, dict(zip(header, values))
            except csv.Error as e:
                raise UserError(f"{where(p, rows.line_num)}: malformed CSV ({e})") from None
        elif name.endswith(".parquet"):
            try:
                import pyarrow
                import pyarrow.parquet as pq
            except ImportError:
                raise UserError(f"{p}: reading parquet needs pyarrow (pip install pyarrow)") from None
            try:
                table = pq.read_table(p)
            except pyarrow.ArrowException as e:
                raise UserError(f"{p}: not a readable parquet file ({str(e).splitlines()[0]})") from None
            yield from enumerate(table.to_pylist())
        else:
            raise UserError(f"{p}: unsupported file type (use .jsonl, .jsonl.gz, .json, .csv or .parquet)")
    except (EOFError, gzip.BadGzipFile, zlib.error):
        raise UserError(f"{p}: truncated or corrupt gzip file") from None
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None


def hub_load_args(spec: str) -> tuple[tuple, dict]:
    """`datasets.load_dataset`'s (args, kwargs) for a Hub spec: a known name (`KNOWN`) with the same split as its
    local file (`DEFAULT_SPLIT`, else test; `HUB_SPLIT` renames a local split the Hub calls otherwise), or
    `owner/name[:split]` (default train)."""
    if spec in KNOWN or spec.rsplit(":", 1)[0] in KNOWN:
        name, split = (spec, DEFAULT_SPLIT.get(spec, "test")) if spec in KNOWN else spec.rsplit(":", 1)
        _, hub_id, data_dir = KNOWN[name]
        return (hub_id,), {"data_dir": data_dir, "split": HUB_SPLIT.get((name, split), split)}
    name, _, split = spec.partition(":")
    return (name,), {"split": split or "train"}


def _hub_records(spec: str):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{spec}: loading a Hub dataset needs the `datasets` package") from None
    args, kwargs = hub_load_args(spec)
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline, no such dataset or split, a gated repo, a broken script: the datasets library's
        raise UserError(f"{spec}: cannot load the Hub dataset ({type(e).__name__}: "  # many error types
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    yield from enumerate(ds)


# ---------------------------------------------------------------- formats


def field_names(rec: dict, limit: int = 12) -> str:
    """A record's field names for an error message: each cut by `shown`, at most `limit` of them, so that a record
    of a thousand columns or a 10 MB key stays one readable line."""
    names = [shown_name(str(k), 40) for k in list(rec)[:limit]]
    return ", ".join(names) + (f", ... ({len(rec)} fields)" if len(rec) > limit else "")


def _text(rec, key, loc) -> str:
    if key not in rec:
        raise UserError(f"{loc}: missing field '{key}' (fields: {field_names(rec)})")
    v = rec[key]
    if not isinstance(v, str):
        raise UserError(f"{loc}: field '{key}' is {type(v).__name__}, expected a string")
    return v


def _text_parts(messages, loc):
    """Messages whose content is a list of parts (the OpenAI / transformers multimodal form,
    [{"type": "text", "text": ...}, ...]) with their text parts joined into one string; other messages as given.
    A non-text part (an image) is an error: a reward model here reads text."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str)
                       for x in parts):
                kinds = sorted({str(x.get("type")) if isinstance(x, dict) else type(x).__name__ for x in parts})
                raise UserError(f"{loc}: message content parts must all be {{\"type\": \"text\", \"text\": ...}}, "
                                f"got {field_names(dict.fromkeys(kinds))}")
            m = {**m, "content": "".join(x["text"] for x in parts)}
        out.append(m)
    return out


def _render(messages, loc, chat_template) -> str:
    roles = {"system": "System", "user": "Human", "assistant": "Assistant"}
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise UserError(f"{loc}: messages must be objects with string 'role' and 'content'")
        if m["role"] not in roles:
            raise UserError(f"{loc}: unknown chat role {shown(m['role'])} (expected system, user or assistant)")
    if chat_template is not None:
        return chat_template(messages)
    return "".join(f"\n\n{roles[m['role']]}: {m['content']}" for m in messages) + ASSISTANT


def _split_hh(chosen: str, rejected: str, loc) -> tuple[str, str, str]:
    """HH-RLHF: the prompt is the shared dialogue up to the last '\\n\\nAssistant:'; the answers follow it."""
    k = chosen.rfind(ASSISTANT)
    if k < 0 or not rejected.startswith(chosen[: k + len(ASSISTANT)]):
        k = rejected.rfind(ASSISTANT)
        if k < 0 or not chosen.startswith(rejected[: k + len(ASSISTANT)]):
            raise UserError(f"{loc}: chosen and rejected dialogues do not share a prefix ending in 'Assistant:'")
    cut = k + len(ASSISTANT)
    return chosen[:cut], chosen[cut:].strip(), rejected[cut:].strip()


def _majority(rec, loc) -> int:
    """PandaLM: majority of three annotators (0 tie, 1 response1, 2 response2); 0 = tie or no majority."""
    votes = []
    for k in ("annotator1", "annotator2", "annotator3"):
        v = rec.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (0, 1, 2):
            raise UserError(f"{loc}: '{k}' must be 0, 1 or 2, got {shown(v)}")
        votes.append(int(v))
    label, count = Counter(votes).most_common(1)[0]
    return label if count >= 2 else 0


def _conversational(rec, c: list, r: list, loc, chat_template) -> tuple[str, str, str]:
    """TRL conversational format: chosen and rejected are message lists ending with the assistant's answer. The
    prompt is the optional `prompt` (a message list, or a string taken as one user turn) followed by the turns
    before the answer, which chosen and rejected must share: a pair answers one conversation."""
    if not all(isinstance(m, dict) for m in c + r):
        raise UserError(f"{loc}: conversational chosen/rejected must be lists of message objects")
    if not c or not r or c[-1].get("role") != "assistant" or r[-1].get("role") != "assistant":
        raise UserError(f"{loc}: conversational chosen/rejected must end with an assistant message")
    _render(c + r, loc, None)  # validates roles and content types
    if [(m["role"], m["content"]) for m in c[:-1]] != [(m["role"], m["content"]) for m in r[:-1]]:
        raise UserError(f"{loc}: conversational chosen and rejected differ before the last assistant turn (a pair "
                        f"must answer one shared conversation)")
    prompt = rec.get("prompt")
    if prompt is None or prompt == "":
        prompt = []
    elif isinstance(prompt, str) and c[:-1] and c[0]["role"] in ("user", "system"):
        # HuggingFaceH4/ultrafeedback_binarized: a string prompt beside whole conversations that already hold it.
        # TRL (`maybe_extract_prompt`) then takes the conversation's own turns; a prompt that is none of its user
        # turns means the record is not what it seems. (Turns that start with the assistant continue the prompt.)
        if not any(m["role"] == "user" and m["content"].strip() == prompt.strip() for m in c[:-1]):
            raise UserError(f"{loc}: field 'prompt' is not one of the user turns of the conversational "
                            f"chosen/rejected that follow it; give the prompt in one place")
        prompt = []
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and len(c) > len(prompt) and _turns(c[:len(prompt)]) == _turns(prompt):
        prompt = []  # whole conversations that begin with the prompt's turns: take them once, not twice
    elif not isinstance(prompt, list):
        raise UserError(f"{loc}: field 'prompt' is {type(prompt).__name__}, expected a string or a list of messages")
    return _render(prompt + c[:-1], loc, chat_template), c[-1]["content"], r[-1]["content"]


def _no_label(value) -> bool:
    """Whether a file's own `label` value says "no label": null, an empty or blank CSV cell, NaN (pandas,
    parquet) or -1 (the usual marker of an unlabelled row)."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "-1")):
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (value != value or value == -1)


def _turns(messages: list) -> list[tuple]:
    """(role, content) of each message: what two message lists must share to be the same turns."""
    return [(m.get("role"), m.get("content")) if isinstance(m, dict) else m for m in messages]


def _scores_tie(rec, loc) -> bool:
    """Whether the record's own ratings of the two answers are equal (UltraFeedback: `score_chosen`,
    `score_rejected`, at the top level as on the Hub or under `metadata`): no preference. False without ratings."""
    scores = rec if "score_chosen" in rec else rec.get("metadata")
    if not isinstance(scores, dict):
        return False
    if any(scores.get(k) is None or (isinstance(scores[k], str) and not scores[k].strip())
           for k in ("score_chosen", "score_rejected")):
        return False  # no rating: JSON null, or an empty (or blank) CSV cell
    values = []
    for k in ("score_chosen", "score_rejected"):
        v = scores[k]
        try:
            x = float(v) if not isinstance(v, bool) else math.nan  # CSV values are strings
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float's range
            x = math.nan
        if not math.isfinite(x):
            raise UserError(f"{loc}: '{k}' must be a finite number, got {shown(v)}")
        values.append(x)
    return values[0] == values[1]


def _parse(rec, loc, columns, chat_template, drop_ties: bool = True):
    """One record -> ('pair', prompt, chosen, rejected) | ('unlabelled', prompt, a, b) | ('drop', reason)."""
    if not isinstance(rec, dict):
        raise UserError(f"{loc}: expected a JSON object, got {type(rec).__name__}")
    if columns:
        mapped = {}
        for ours, theirs in columns.items():
            if theirs not in rec:
                raise UserError(f"{loc}: missing column '{theirs}' (mapped to '{ours}')")
            mapped[ours] = rec[theirs]
        rec = mapped
    # a label beside two answers, mapped or the file's own columns (0 = answer_a is better, 1 = answer_b). A file's
    # own label that is absent in the usual ways (null, an empty CSV cell, NaN, -1) leaves the pair unlabelled
    if "label" in rec and (columns or ({"answer_a", "answer_b"} <= set(rec) and not {"chosen", "rejected"} & set(rec)
                                       and not _no_label(rec["label"]))):
        lab = rec["label"]
        if isinstance(lab, str) and lab.strip().isdecimal():  # isdigit() takes "²", int() does not
            try:
                lab = int(lab)
            except ValueError:  # more digits than int() reads (sys.get_int_max_str_digits)
                pass  # refused below, with the value shown
        # 0 = answer_a is better, 1 = answer_b is better.
        if lab not in (0, 1) or isinstance(lab, bool):
            raise UserError(f"{loc}: label must be 0 or 1 (answer_a / answer_b better), got {shown(lab)}")
        a, b = _text(rec, "answer_a", loc), _text(rec, "answer_b", loc)
        first = lab == 0
        return ("pair", _text(rec, "prompt", loc), a if first else b, b if first else a)
    keys = set(rec)
    if {"instruction", "response1", "response2"} <= keys:
        label = _majority(rec, loc)
        if label == 0:
            return ("drop", "tie or no majority among annotators")
        prompt = _text(rec, "instruction", loc)
        if rec.get("input"):
            prompt += "\n\n" + _text(rec, "input", loc)
        # The PandaLM release stores a few one-word answers as JSON booleans (true for "True"): keep them as text.
        for k in ("response1", "response2"):
            if isinstance(rec.get(k), float) and not math.isfinite(rec[k]):
                raise UserError(f"{loc}: field '{k}' is {rec[k]}, expected a string")
        r1, r2 = (str(rec[k]) if isinstance(rec.get(k), (bool, int, float)) else _text(rec, k, loc)
                  for k in ("response1", "response2"))
        return ("pair", prompt, r1, r2) if label == 1 else ("pair", prompt, r2, r1)
    if {"answer_a", "answer_b"} <= keys and {"chosen", "rejected"} & keys:
        raise UserError(f"{loc}: the record has both answer_a/answer_b (unlabelled) and chosen/rejected (labelled) "
                        f"fields; keep one kind")
    if {"answer_a", "answer_b"} <= keys:
        return ("unlabelled", _text(rec, "prompt", loc), _text(rec, "answer_a", loc), _text(rec, "answer_b", loc))
    if {"chosen", "rejected"} <= keys:
        c, r = rec["chosen"], rec["rejected"]
        if isinstance(c, list) and isinstance(r, list):  # TRL conversational format
            pair = ("pair", *_conversational({**rec, "prompt": _text_parts(rec.get("prompt"), loc)},
                                             _text_parts(c, loc), _text_parts(r, loc), loc, chat_template))
        else:
            c, r = _text(rec, "chosen", loc), _text(rec, "rejected", loc)
            if isinstance(rec.get("prompt"), list):  # a conversation as the prompt, plain-text answers
                pair = ("pair", _render(_text_parts(rec["prompt"], loc), loc, chat_template), c, r)
            elif "prompt" in rec:  # TRL standard format
                prompt = _text(rec, "prompt", loc)
                if prompt.rstrip().endswith(ASSISTANT.strip()) and c.startswith(prompt) and r.startswith(prompt):
                    # HH-RLHF dialogues beside their own prompt (a prompt column added, the answers left whole):
                    # the answers are what follows it, else the model would read the prompt twice
                    c, r = c[len(prompt):].strip(), r[len(prompt):].strip()
                pair = ("pair", prompt, c, r)
            elif ASSISTANT in c:  # HH-RLHF raw dialogues
                pair = ("pair", *_split_hh(c, r, loc))
            else:
                raise UserError(f"{loc}: 'chosen'/'rejected' without a 'prompt' field and not HH-RLHF dialogues")
        if drop_ties and _scores_tie(rec, loc):
            return ("drop", "tie: score_chosen == score_rejected")
        return pair
    raise UserError(f"{loc}: unrecognised record format (fields: {field_names(rec)}); supported: HH-RLHF "
                    f"(chosen, rejected), TRL (prompt, chosen, rejected; strings or messages), PandaLM, "
                    f"unlabelled (prompt, answer_a, answer_b), or a column mapping (data.columns)")


def _input_id(rec):
    """The record's own id: the value of the first of `ID_COLUMNS` it has (a string or an integer), else None.
    Parquet and pandas store integer ids with a missing value as floats (3.0: given as 3) and dates as date
    objects (given as their ISO text)."""
    import datetime

    for k in ID_COLUMNS:
        v = rec.get(k)
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            return int(v)
        if isinstance(v, (datetime.date, datetime.time)):
            return v.isoformat()
        if isinstance(v, (str, int)):
            return v
    return None


def _load(spec, columns, limit, chat_template, want, drop_ties=True) -> Loaded:
    path = resolve_data_spec(spec)
    records = _hub_records(path[4:]) if path.startswith("hub:") else _read_records(path)
    source = spec if (spec in KNOWN or ":" in spec and not Path(spec).exists()) else Path(path).name.split(".")[0]
    out, drops, total = [], Counter(), 0
    numbers, input_ids, skipped = [], [], []

    def skip(n, rec, reason, **extra):
        drops[reason] += 1
        key = _input_id(rec)
        skipped.append({"record": n, **({"input_id": key} if key is not None else {}), "reason": reason, **extra})

    first_kind = None  # (record number, kind) of the first labelled or unlabelled record: one file holds one kind
    for n, rec in records:
        total += 1
        kind, *fields = _parse(rec, where(path, n), columns, chat_template, drop_ties)
        if kind == "drop":
            skip(n, rec, fields[0])
            continue
        first_kind = first_kind or (n, kind)
        if kind != first_kind[1]:
            names = {"pair": "a labelled (chosen/rejected)", "unlabelled": "an unlabelled (answer_a/answer_b)"}
            raise UserError(f"{where(path, n)}: {names[kind]} record, but record {first_kind[0]} is {names[first_kind[1]]} "
                            f"one; one file holds one kind")
        if kind == "unlabelled" and want == "pair":
            raise UserError(f"{where(path, n)}: the record has no labels (prompt, answer_a, answer_b); use such a file "
                            f"as an unlabelled pool (data.pool)")
        prompt, a, b = fields
        if a == b:
            skip(n, rec, "identical answers")
            continue
        if not a.strip() or not b.strip():
            skip(n, rec, "empty answer")
            continue
        try:
            pid = pair_id(prompt, a, b)
        except UnicodeEncodeError:  # JSON allows "\ud800"; no tokenizer or hash accepts it
            raise UserError(f"{where(path, n)}: text is not valid Unicode (an unpaired surrogate)") from None
        if want == "pair":
            out.append(Pair(pid, prompt, a, b, source))
        else:
            out.append(UnlabelledPair(pid, prompt, a, b, source) if kind == "unlabelled" else
                       _unlabelled(Pair(pid, prompt, a, b, source)))
        numbers.append(n)
        input_ids.append(_input_id(rec))
        if limit is not None and len(out) >= limit:
            break
    if total == 0:
        raise UserError(f"{path}: no records (empty file)")
    for reason, count in drops.items():
        log.info("%s: dropped %d of %d records (%s)", source, count, total, reason)
    if not out:
        raise UserError(f"{path}: no usable pairs (all {total} records dropped: {dict(drops)})")
    keep = dedupe_indices(out)
    first = {out[i].id: i for i in keep}
    kept = set(keep)
    for i, p in enumerate(out):
        if i not in kept:
            skipped.append({"record": numbers[i], **({"input_id": input_ids[i]} if input_ids[i] is not None else {}),
                            "reason": "duplicate", "duplicate_of": numbers[first[p.id]]})
    skipped.sort(key=lambda x: x["record"])
    return Loaded(str(path), [out[i] for i in keep], [numbers[i] for i in keep], [input_ids[i] for i in keep],
                  skipped)


def load_pairs(spec: str, *, columns: dict | None = None, limit: int | None = None, chat_template=None,
               drop_ties: bool = True) -> list[Pair]:
    """Human-labelled pairs from a data spec, deduplicated. Unusable records (identical or empty answers, ties)
    are dropped with a count in the log; bad records raise `UserError("FILE:RECORD: problem")`. drop_ties: drop
    records whose own ratings of the answers are equal (UltraFeedback's score_chosen == score_rejected)."""
    return _load(spec, columns, limit, chat_template, "pair", drop_ties).pairs


def load_unlabelled(spec: str, *, columns=None, limit=None, chat_template=None) -> list[UnlabelledPair]:
    """A pool: a file of (prompt, answer_a, answer_b), or any labelled file with its labels discarded."""
    return _load(spec, columns, limit, chat_template, "unlabelled").pairs


def load_records(spec: str, *, labelled: bool = True, columns=None, limit=None, chat_template=None,
                 drop_ties: bool = True) -> Loaded:
    """`load_pairs` (labelled) or `load_unlabelled`, with the record number and own id of each pair and the
    records left out with the reason (for output that joins back to the input: `ser score`)."""
    return _load(spec, columns, limit, chat_template, "pair" if labelled else "unlabelled", drop_ties)


def drop_test_pairs(pairs: list, test: list[Pair], what: str, other: str = "the test set") -> list:
    """`pairs` without the ones that are also in `test` (the same prompt and answers in either order, whitespace
    aside: `_leak_key`), so that no pair is both trained on and evaluated on (or, with `other` = the
    human seed, both human-labelled and pseudo-labelled). The count is logged; none left is a UserError naming
    `what`."""
    test_keys = {_leak_key(p) for p in test}
    kept = [p for p in pairs if _leak_key(p) not in test_keys]
    if len(kept) < len(pairs):
        log.warning("removed %d of %d %s pairs that also appear in %s", len(pairs) - len(kept), len(pairs), what,
                    other)
    if pairs and not kept:
        raise UserError(f"{what}: all {len(pairs)} pairs also appear in {other}; none left")
    return kept


def _leak_key(p) -> str:
    """A pair's id with the whitespace of its texts collapsed: one pair read from two formats (HH-RLHF dialogues,
    whose answers are stripped, and TRL records, whose answers often begin with a space) is one pair here."""
    a, b = (p.chosen, p.rejected) if isinstance(p, Pair) else (p.answer_a, p.answer_b)
    return pair_id(*(" ".join(t.split()) for t in (p.prompt, a, b)))


def dedupe_indices(pairs: list) -> list[int]:
    """Indices of the first pair of each id, in input order. A labelled duplicate with the other answer chosen
    loses its label: warned, counted."""
    first, keep, conflicts = {}, [], 0
    for i, p in enumerate(pairs):
        j = first.setdefault(p.id, i)
        if j == i:
            keep.append(i)
        elif isinstance(p, Pair) and p.chosen != pairs[j].chosen:
            conflicts += 1
    if len(keep) < len(pairs):
        log.info("dropped %d duplicate pairs (same prompt and answers)", len(pairs) - len(keep))
    if conflicts:
        log.warning("%d duplicate pairs had the opposite label of an earlier copy; kept the earlier label", conflicts)
    return keep


def dedupe(pairs: list) -> list:
    """The first of each id (`dedupe_indices`)."""
    return [pairs[i] for i in dedupe_indices(pairs)]


def hide_labels(pairs: list[Pair]) -> tuple[list[UnlabelledPair], dict[str, int]]:
    """The firewall: the unlabelled view of labelled pairs (answer order from the id only) and, kept apart for
    the audit, id -> 0 if answer_a is the human-chosen answer else 1."""
    pool = [_unlabelled(p) for p in pairs]
    return pool, {u.id: 0 if u.answer_a == p.chosen else 1 for u, p in zip(pool, pairs)}


def _unlabelled(p: Pair) -> UnlabelledPair:
    """Answer order from the texts and the id only, never from the label (sorted, then swapped by id parity)."""
    x, y = sorted((p.chosen, p.rejected))
    a, b = (x, y) if int(p.id, 16) % 2 == 0 else (y, x)
    return UnlabelledPair(p.id, p.prompt, a, b, p.source)


def resolve_count(size, n: int, name: str) -> int:
    """A size given as a fraction of n (float) or a count (int), as an int; `name` is for the error."""
    if isinstance(size, float):
        if not 0 <= size <= 1:
            raise UserError(f"config: '{name}' as a fraction must be in [0, 1], got {shown(size)}")
        return round(size * n)
    if size < 0:
        raise UserError(f"config: '{name}' must be >= 0, got {shown(size)}")
    return size


def split_pairs(pairs: list[Pair], *, seed_size, test_size, pool_size=None, seed: int = 0) -> Split:
    """test, seed and pool sets by fraction (of all usable pairs, after `dedupe`) or count. The order is a hash of
    (seed, pair id), so the split is deterministic; re-ordering the input changes it only through `dedupe` (which of
    two conflicting duplicates is kept) or a data.limit applied before it."""
    pairs = dedupe(pairs)
    n = len(pairs)
    n_test, n_seed = resolve_count(test_size, n, "data.test_size"), resolve_count(seed_size, n, "data.seed_size")
    n_pool = n - n_test - n_seed if pool_size is None else resolve_count(pool_size, n, "data.pool_size")
    if n_test + n_seed + n_pool > n or n_pool < 0:
        hint = (f" (data.seed_size = {seed_size} is a fraction of all {n}, the test pairs included; for every "
                f"pair but the test pairs give a count: data.seed_size={n - n_test})"
                if isinstance(seed_size, float) and n_test < n else "")
        raise UserError(f"data: asked for {n_test} test + {n_seed} seed + {max(n_pool, 0)} pool pairs, "
                        f"but only {n} usable pairs exist{hint}")
    order = sorted(pairs, key=lambda p: hashlib.sha1(f"{seed}:{p.id}".encode()).hexdigest())
    return Split(seed=order[n_test : n_test + n_seed], pool=order[n_test + n_seed : n_test + n_seed + n_pool],
                 test=order[:n_test], n_pairs=n)
