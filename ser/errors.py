"""The one exception type for bad user input: the CLI prints it on one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (file, record, config, model directory) — never a bug.

    The message names the file, the record (line or index) and the problem, e.g.
    ``data.jsonl:17: field 'chosen' is a list, expected a string``.
    """


def where(path, record=None) -> str:
    """`path` or `path:record` — the prefix every UserError message starts with."""
    return f"{path}" if record is None else f"{path}:{record}"


def shown(value, limit: int = 60) -> str:
    """repr(value) for an error message, cut to `limit` characters with the full length said (a label or a setting
    may be a 5,000-digit string), so that the message stays one readable line."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters)"


def shown_name(text: str, limit: int) -> str:
    """`text` as it is where it is a readable name (at most `limit` characters, printable: a field or file name),
    else `shown(text, limit)`: quoted and cut, so that a 10 MB key or a name with a line break stays one line."""
    return text if len(text) <= limit and text.isprintable() else shown(text, limit)
