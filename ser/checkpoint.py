"""Checkpoints: atomic writes, a manifest of content hashes, and the saved reward-model directory.

Everything is written to a temporary sibling first, flushed, and renamed into place, so a crash (even
kill -9) leaves either the old complete version or the new complete version, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ser.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SER_CONFIG = "ser_config.json"


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable across a power loss (a kill never loses it). Best effort: some
    filesystems refuse to open or fsync a directory, and the rename stays atomic there all the same."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_umask() -> int:
    """The process's umask: from /proc/self/status where Linux has it (reading it with os.umask means setting it,
    for a moment, for every thread), else by setting it and straight back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True, temp_prefix: str | None = None) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part: a uniquely
    named temporary file in the same directory (mkstemp: two writers never share one, even with one pid in two
    containers), then os.replace (atomic on POSIX). `durable` fsyncs the file and the directory around the rename,
    so that a power loss keeps it too; a frozen-layer cache's entries skip that (they are checksummed and rebuilt
    when damaged). The temporary name is `.NAME.*.tmp` (what `remove_debris` deletes) unless `temp_prefix` is
    given (the cache's `KEY.`, left to `ser.frozen.remove_stale_writes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix or f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would outlive the rename: the mode `open` would give
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of `text` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_npz(path: str | Path, **arrays) -> None:
    """`np.savez(path, **arrays)` through `atomic_write_bytes`: the whole archive or the old file, never a part."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def finite_json(obj):
    """`obj` made strictly JSON-serialisable: non-finite numbers (NaN, ±inf), which `json.dumps` would write as
    bare `NaN`/`Infinity` that strict parsers reject, become None (null); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, numbers.Integral) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, numbers.Real) and not isinstance(obj, bool):
        return float(obj) if math.isfinite(obj) else None
    return obj


def json_text(obj, **kwargs) -> str:
    """`json.dumps` that always writes valid (strict) JSON: non-finite numbers as null (`finite_json`)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line (strict JSON: non-finite numbers as null) and fsync it (metrics survive a crash right
    after the call)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json_text(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path: str | Path, key: str, last: int) -> None:
    """On resume: keep the metric lines with record[key] <= last (work after the checkpoint is redone); a line
    torn by a kill is dropped."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get(key, last) <= last:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify_manifest(directory: str | Path) -> None:
    """Raise UserError if any file listed in the manifest is missing, resized or changed."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise UserError(f"{directory}: not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupt manifest") from None
    if not isinstance(manifest, dict) or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                                                 and isinstance(e.get("sha256"), str) for e in manifest.values()):
        raise UserError(f"{path}: corrupt manifest (expected {{file: {{sha256, bytes}}}})")
    for name, entry in manifest.items():
        f = directory / name
        if not f.exists():
            raise UserError(f"{directory}: checkpoint file '{name}' is missing")
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise UserError(f"{directory}: checkpoint file '{name}' is corrupt (hash mismatch)")


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary directory; on success it gets a manifest, is fsynced and renamed to `target`
    (replacing an older version). On error the temporary directory is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700, as for atomic_write_bytes
        yield tmp
        write_manifest(tmp)
        mask = current_umask()
        for p in [*tmp.rglob("*"), tmp]:  # the files, then the directories that name them
            if p.is_file():
                p.chmod(0o666 & ~mask)  # safetensors writes 0600: others could not load the RM
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            elif p.is_dir():
                fsync_dir(p)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError) and isinstance(e, Exception) and shutil.disk_usage(target.parent).free < 1 << 20:
            # torch.save and safetensors report a full disk as RuntimeError/SafetensorError
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from e
        raise


def restore_swapped(target: str | Path) -> Path:
    """`atomic_dir` replaces an existing `target` in two renames (target -> .target.old, new -> target); a process
    killed between them leaves no `target`, only `.target.old`, the complete previous version: renamed back here
    (logged). Call before reading a directory that a killed run may have been replacing. Returns target."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not target.exists():
        try:  # several processes of one run may race here: one renames, the others find the target in place
            os.replace(old, target)
        except OSError:
            if not target.exists():
                raise
        else:
            fsync_dir(target.parent)
            log.warning("%s: restored the previous version, which a killed process was replacing", target)
    return target


def remove_debris(run: Path) -> None:
    """Delete what killed writers leave under `run`, which nothing reads and repeated kills would pile up: the
    temporary files and directories of `atomic_write_bytes` and `atomic_dir` (`.NAME.*.tmp`, never renamed, so
    never complete), and a `.NAME.old` whose NAME is in place (atomic_dir's second rename happened). Call before
    any writer starts (`check_resumable`, after `restore_swapped`). A frozen-layer cache's files in writing
    (`KEY.*.tmp`, which another process sharing the cache may own) are no dotfiles: left alone
    (`ser.frozen.remove_stale_writes` removes them after a day)."""
    for p in sorted(run.rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        stale = p.name.endswith(".tmp") or (p.name.endswith(".old") and p.with_name(p.name[1:-4]).exists())
        if stale and p.exists():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            log.info("%s: removed what a killed process left", p)


def check_whole(model) -> None:
    """Refuse to save a DeepSpeed ZeRO-3 shard (its large parameters are empty tensors on each process) or an
    FSDP shard (DTensor parameters) as if it were the model: gather first with `ser.models.full_parameters`."""
    sharded = [name for name, p in model.named_parameters() if p.numel() == 0 or type(p).__name__ == "DTensor"]
    if sharded:
        raise RuntimeError(f"refusing to save a sharded model ({len(sharded)} sharded parameters, e.g. "
                           f"{sharded[0]}); save inside ser.models.full_parameters(model)")


def check_pad_token(model, tokenizer) -> None:
    """Refuse to save an RM whose config and tokenizer disagree on the pad token, or whose pad token is also its
    bos/eos/unk token: transformers and TRL read the reward at the last token that is not `config.pad_token_id`,
    so such a directory scores answers that end with eos differently from ser (`ser.models.set_reward_pad_token`,
    called by `load_reward_model`, gives the RM a pad token of its own)."""
    pad = model.config.get_text_config().pad_token_id
    if pad is None or pad != tokenizer.pad_token_id:
        raise RuntimeError(f"refusing to save a reward model whose config pad_token_id ({pad}) differs from its "
                           f"tokenizer's ({tokenizer.pad_token_id}); load it with ser.models.load_reward_model")
    if pad in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        raise RuntimeError(f"refusing to save a reward model whose pad token {tokenizer.pad_token!r} is also its "
                           f"bos/eos/unk token; load it with ser.models.load_reward_model")


def save_reward_model(model, tokenizer, target: str | Path, ser_config: dict) -> Path:
    """Save an RM directory that `AutoModelForSequenceClassification.from_pretrained` loads unchanged:
    transformers config (with the tokenizer's `pad_token_id`), safetensors weights, tokenizer (with chat template),
    and `ser_config.json` (the resolved config plus reward statistics on the training data). Raises RuntimeError
    for a sharded model (`check_whole`) or inconsistent pad tokens (`check_pad_token`): programming errors."""
    check_whole(model)
    check_pad_token(model, tokenizer)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SER_CONFIG).write_text(json_text(ser_config, indent=2, sort_keys=True, default=str))
    return Path(target)


def read_ser_config(directory: str | Path) -> dict:
    """The directory's ser_config.json as a dict ({} when there is none). Raises UserError if it is not a
    JSON object."""
    path = Path(directory) / SER_CONFIG
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: corrupt ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: corrupt (expected a JSON object, got {type(data).__name__})")
    return data


RUN_COMMAND = "command"  # a run directory's first file: the command that writes it (train-rm, evolve, ppo, ...)


def start_run(out: str | Path, command: str, config_yaml: str) -> None:
    """A new run's first files: `RUN_COMMAND` (so that --resume can tell the run's command before its first
    checkpoint) and the resolved config.yaml. Old metrics of a run that stopped before its first checkpoint
    (`refuse_existing_run` lets a new run start over there) go."""
    out = Path(out)
    atomic_write_text(out / RUN_COMMAND, command + "\n")
    atomic_write_text(out / "config.yaml", config_yaml)
    (out / "metrics.jsonl").unlink(missing_ok=True)


RUN_COMMANDS = ("train-rm", "evolve", "ppo", "sft", "experiment", "curve")


def _marked_run(directory: Path) -> str | None:
    """The command of a run directory that `start_run` marked (its `RUN_COMMAND` file names one), else None."""
    marker = directory / RUN_COMMAND
    with contextlib.suppress(OSError):
        if marker.is_file() and marker.stat().st_size < 64:
            command = marker.read_text(encoding="utf-8", errors="replace").strip()
            return command if command in RUN_COMMANDS else None
    return None


def run_kind(run: str | Path) -> str | None:
    """Which command wrote the run directory `run`: its `RUN_COMMAND` file, else (runs from before it) the files
    only that command writes: "evolve", "ppo", "train-rm", "experiment", "curve", or None (none of them yet)."""
    run = Path(run)
    if (run / RUN_COMMAND).is_file():
        return (run / RUN_COMMAND).read_text(encoding="utf-8", errors="replace").strip() or None
    if any((run / name).exists() for name in ("state.json", "iterations", "folds", "seed_epochs")):
        return "evolve"
    if (run / "checkpoint" / "ppo_state.pt").exists():
        return "ppo"
    if (run / "result.json").exists() or (run / "rm").exists() or (run / "checkpoint").exists():
        return "train-rm"
    if (run / "settings.json").exists():
        return "experiment"
    if (run / "curve.json").exists():
        return "curve"
    return None


def check_resumable(run: str | Path, kind: str) -> Path:
    """`run` as a Path if it is a run directory of `ser {kind}` (config.yaml, and no other command's files);
    else UserError naming what it is."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: not a `ser {kind}` run directory (no config.yaml)")
    for old in run.glob(".*.old"):  # a checkpoint, rm/ or final/ caught between atomic_dir's two renames
        restore_swapped(run / old.name[1:-4])
    found = run_kind(run)
    if found not in (None, kind):
        raise UserError(f"{run}: a `ser {found}` run, not a `ser {kind}` run")
    if int(os.environ.get("RANK", "0")) == 0:  # no writer runs yet: what a killed one left is debris
        remove_debris(run)
    return run


RESUMABLE = {"train-rm", "evolve", "ppo"}  # the commands with --resume (`ser sft` has none)
# What a run writes before its first checkpoint: a directory holding only these may be started over.
EARLY_RUN_FILES = {RUN_COMMAND, "config.yaml", "data_hash", "metrics.jsonl"}


def refuse_existing_run(out: str | Path) -> None:
    """A new run never writes into a directory that holds a run (any command's checkpoint or result, or a
    config.yaml beside other files): UserError pointing to --resume or another --out. A directory with nothing
    but a run's first files (`EARLY_RUN_FILES`: it stopped before its first checkpoint) is started over.
    Called before anything is written."""
    out = Path(out)
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}  # not another process's temporary files
    kind = run_kind(out)
    if (kind or "config.yaml" in names) and not names <= EARLY_RUN_FILES:
        how = (f"`ser {kind} --resume {out}` continues it" if kind in RESUMABLE else
               f"--resume {out} continues it" if kind is None else
               f"`ser {kind}` with the same --out continues it" if kind in ("experiment", "curve") else
               f"a `ser {kind}` run cannot be resumed")
        raise UserError(f"{out}: already holds a run; {how}, or give another --out")


def check_out_file(out_file: str | Path, *inputs: str | Path) -> Path:
    """`out_file` as a Path if a command may write it: a file name (not an existing directory, not ending in a
    slash) in a directory that is or can be made writable (`check_can_write`), and neither one of `inputs` (the
    local files and directories the same command reads; other specs are ignored) nor inside one of them (a
    reward-model directory), nor inside a run directory that `start_run` marked (its metrics, config or results).
    Another existing file is replaced, with a warning. Raises UserError naming what is wrong; writes nothing."""
    out = Path(out_file)
    if not out.name or str(out_file).endswith(("/", "\\")) or out.is_dir():
        raise UserError(f"{out_file}: --out is a directory; give a file name, e.g. {out / 'out.jsonl'}")
    check_can_write(out.parent, str(out_file))
    for path in map(Path, inputs):
        if not path.exists():
            continue
        if (out.exists() and out.samefile(path)) or (path.is_dir() and out.resolve().is_relative_to(path.resolve())):
            raise UserError(f"{out_file}: --out would overwrite the input {path}; give another file name")
    run, kind = next(((d, k) for d in out.absolute().parents if (k := _marked_run(d))), (None, None))
    if run is not None:
        raise UserError(f"{out_file}: --out is inside the {kind} run {run}, whose files it could replace; give a "
                        f"file outside it")
    if out.exists():
        log.warning("%s exists: replacing it", out_file)
    return out


def check_can_write(directory: str | Path, what: str | None = None) -> None:
    """UserError unless `directory` is a writable directory or could be created as one (its nearest existing
    ancestor is a writable directory). Creates nothing. `what` names the output in the message."""
    directory = Path(directory).absolute()
    nearest = next(p for p in (directory, *directory.parents) if p.exists())
    if not nearest.is_dir():
        raise UserError(f"{what or directory}: cannot write there ({nearest} is a file, not a directory)")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"{what or directory}: cannot write there ({nearest} is not writable)")


def check_writable(out: str | Path) -> Path:
    """Fail early, before any work, if the output directory cannot be created or written."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise UserError(f"{out}: output directory is not writable ({e.strerror})") from None
    return out
