"""Prompt datasets: read JSONL, Parquet or a `datasets` directory, map the columns, validate every
record, and fingerprint the content.

Every problem names the file, the line (JSONL, 1-based) or row (tables, 0-based) and the field.
"""

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DataError
from core.types import CHAT_ROLES, Messages
from trainer.config import ColumnsConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One validated record. `prompt` is plain text or chat messages; `where` is `file:line` (or `file: row N`)."""

    id: str
    prompt: str | Messages
    context: str
    answer: str | None
    task: str
    where: str
    extra: dict = field(default_factory=dict, compare=False)
    """The record's other fields (e.g. a `tests` column), passed to reward functions as TRL does."""


@dataclass
class DataReport:
    """What loading kept and skipped; `skipped` holds one located reason per skipped record."""

    path: str
    kept: int = 0
    skipped: list[str] = field(default_factory=list)


class _Invalid(Exception):
    """Internal: a record problem, located by the reader loop."""


# ----------------------------------------------------------------------------------------------
# Validation of one record (pure)
# ----------------------------------------------------------------------------------------------

def _check_messages(value: list) -> Messages:
    if not value:
        raise _Invalid("an empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise _Invalid(f"message {i} is not {{'role': str, 'content': str}}: {message!r:.80}")
        if message["role"] not in CHAT_ROLES:
            raise _Invalid(f"message {i} has unknown role {message['role']!r} (allowed: {', '.join(sorted(CHAT_ROLES))})")
        if message["role"] == "user" and not message["content"].strip():
            raise _Invalid(f"message {i}: empty user content")
        _check_unicode(message["content"], f"message {i}")
    if not any(m["role"] == "user" for m in value):
        raise _Invalid("no 'user' message (the teacher's context goes into the last one)")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_unicode(value: str, what: str):
    # JSON can escape a lone surrogate (\ud800), which no tokenizer or UTF-8 writer accepts.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Invalid(f"{what}: not valid Unicode ({e.reason} at character {e.start + 1})") from None


def _text(record: dict, column: str, *, required: bool) -> str | None:
    if column not in record or record[column] is None:
        if required:
            raise _Invalid(f"field '{column}': missing")
        return None
    value = record[column]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # numeric answers and ids are common in JSON; their text form is unambiguous
    if not isinstance(value, str):
        raise _Invalid(f"field '{column}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _Invalid(f"field '{column}': empty string")
    _check_unicode(value, f"field '{column}'")
    return value


def to_example(record: Any, columns: ColumnsConfig, default_id: str, where: str) -> Example:
    """Validates one raw record against the column mapping; raises `_Invalid` naming the field."""
    if not isinstance(record, dict):
        raise _Invalid(f"expected a JSON object, got {type(record).__name__}")
    if columns.prompt not in record or record[columns.prompt] is None:
        raise _Invalid(f"field '{columns.prompt}': missing")
    raw_prompt = record[columns.prompt]
    if isinstance(raw_prompt, list):
        try:
            prompt = _check_messages(raw_prompt)
        except _Invalid as e:
            raise _Invalid(f"field '{columns.prompt}': {e}") from None
    else:
        prompt = _text(record, columns.prompt, required=True)
    return Example(
        id=(_text(record, columns.id, required=False) if columns.id else None) or default_id,
        prompt=prompt,
        context=_text(record, columns.context, required=True),
        answer=_text(record, columns.answer, required=False) if columns.answer else None,
        task=(_text(record, columns.task, required=False) if columns.task else None) or "default",
        where=where,
        extra={k: v for k, v in record.items() if k not in dataclasses.asdict(columns).values()},
    )


# ----------------------------------------------------------------------------------------------
# Readers: yield (where, default id, record) or raise DataError for problems that stop the file
# ----------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> Iterator[tuple[str, str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, "", _Invalid(f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})")
                continue
            if not text.strip():
                continue  # blank lines (a trailing newline) are not records
            try:
                yield where, f"{path.name}:{lineno}", json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield where, "", _Invalid(f"not valid JSON: {e.msg} (column {e.colno})")
            except RecursionError:
                yield where, "", _Invalid("not valid JSON: nested too deeply")


def _read_rows(path: Path, rows: list[dict]) -> Iterator[tuple[str, str, Any]]:
    for i, row in enumerate(rows):
        yield f"{path}: row {i}", f"{path.name}:{i}", row


def _read(path: Path) -> Iterator[tuple[str, str, Any]]:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        import datasets  # slow to import; only datasets directories need it
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: holds splits {sorted(ds)}; point at one of them, e.g. {path / next(iter(ds))}")
        return _read_rows(path, ds.to_list())
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            return _read_rows(path, pq.read_table(path).to_pylist())
        except Exception as e:  # pyarrow raises its own ArrowInvalid family
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    raise DataError(f"{path}: unsupported format '{path.suffix}'; use .jsonl, .parquet or a datasets directory")


def load_examples(path: str | Path, columns: ColumnsConfig | None = None,
                  on_invalid: str = "error") -> tuple[list[Example], DataReport]:
    """Loads and validates every record. With on_invalid='error' the first bad record raises a
    DataError naming file, line and field; with 'skip' bad records are counted in the report."""
    path, columns = Path(path), columns or ColumnsConfig()
    examples, report, seen = [], DataReport(str(path)), {}
    for where, default_id, record in _read(path):
        try:
            if isinstance(record, _Invalid):
                raise record
            example = to_example(record, columns, default_id, where)
            if example.id in seen:
                raise _Invalid(f"field '{columns.id}': duplicate id {example.id!r} (first at {seen[example.id]})")
        except _Invalid as e:
            if on_invalid == "error":
                raise DataError(f"{where}: {e}") from None
            report.skipped.append(f"{where}: {e}")
            continue
        seen[example.id] = where
        examples.append(example)
    report.kept = len(examples)
    if report.skipped:
        logger.warning("%s: skipped %d invalid record(s), kept %d; first: %s",
                       path, len(report.skipped), report.kept, report.skipped[0])
    if not examples:
        raise DataError(f"{path}: no valid records" + (f" ({len(report.skipped)} skipped)" if report.skipped else ""))
    return examples, report


def load_eval_sets(paths: str | list[str] | None, columns: ColumnsConfig | None = None,
                   on_invalid: str = "error") -> tuple[list[Example], DataReport | None]:
    """One or several held-out sets, concatenated, with one report for all; an id that two sets
    share is an error, because results are kept by id."""
    if not paths:
        return [], None
    paths = list(dict.fromkeys([paths] if isinstance(paths, str) else paths))  # a set named twice counts once
    examples, seen, report = [], {}, DataReport(", ".join(str(p) for p in paths))
    for path in paths:
        loaded, part = load_examples(path, columns, on_invalid)
        report.skipped += part.skipped
        for example in loaded:
            if example.id in seen:
                raise DataError(f"{example.where}: duplicate id {example.id!r} across eval sets (also at {seen[example.id]})")
            seen[example.id] = example.where
            examples.append(example)
    report.kept = len(examples)
    return examples, report


def fingerprint(examples: list[Example]) -> str:
    """Content hash of the records (not of file names or formats), to detect a changed dataset on resume."""
    digest = hashlib.sha256()
    for example in examples:
        content = {k: v for k, v in dataclasses.asdict(example).items() if k != "where" and not (k == "extra" and not v)}
        digest.update(json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]
