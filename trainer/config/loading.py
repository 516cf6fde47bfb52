"""Loading: YAML file -> dotted command-line overrides -> per-field type and range checks ->
cross-field checks in `Config.__post_init__`. Every error is a `ConfigError` whose message reads
`<where>: <field.path>: <problem>`, where <where> is `file:line` or the override that set it.
Nothing is ever rewritten silently: a conflict is an error.
"""

import dataclasses
import difflib
import math
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from core.errors import ConfigError
from trainer.config.reference import reference
from trainer.config.sections import Config, Range, join_path, yaml_key

# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

class _Source:
    """Says where a field's value came from: `file:line`, a command-line override, or a default."""

    def __init__(self, file: str | None, lines: dict[str, int], overrides: dict[str, str]):
        self.file, self.lines, self.overrides = file, lines, overrides

    def locate(self, path: str) -> str:
        if path in self.overrides:
            return f"override '{self.overrides[path]}'"
        prefix = path
        while prefix:  # the nearest enclosing key that has a line, e.g. a list item's list
            if prefix in self.lines:
                return f"{self.file}:{self.lines[prefix]}"
            prefix = prefix.rpartition(".")[0]
        return self.file or "<config>"

    def fail(self, path: str, message: str):
        raise ConfigError(f"{self.locate(path)}: {path}: {message}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config (or starts from defaults when path is None), applies `a.b=value` overrides, validates."""
    data, lines = {}, {}
    file = str(path) if path is not None else None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
        lines = _line_map(node)
    applied = {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value, item)
        applied[key] = item
    source = _Source(file, lines, applied)
    return _build(Config, data, "", source)


def config_from_dict(data: dict) -> Config:
    """Rebuilds a config from `config_to_dict` output (e.g. a run directory's config.yaml), with full checks."""
    return _build(Config, data, "", _Source(None, {}, {}))


def config_to_dict(cfg: Config) -> dict:
    return _to_dict(cfg)


def _to_dict(value: Any) -> Any:
    """dataclasses.asdict, with the YAML key of each field (`train.async` for the field `async_`)."""
    if dataclasses.is_dataclass(value):
        return {yaml_key(f.name): _to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_dict(v) for k, v in value.items()}
    return value


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def _line_map(node, prefix: str = "") -> dict[str, int]:
    """Maps dotted key paths to 1-based YAML line numbers."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_line_map(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}.{i}"
            lines[path] = item.start_mark.line + 1
            lines.update(_line_map(item, path))
    return lines


class _OverrideText(str):
    """An override's raw text; it is parsed once the field's type is known (see `_coerce`)."""


def _parse_override(item: str) -> tuple[str, "_OverrideText"]:
    key, sep, raw = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override '{item}': expected 'section.field=value', e.g. 'loss.divergence=forward_kl'")
    return key, _OverrideText(raw)


def _parse_override_text(raw: str, tp: Any) -> Any:
    """A string field takes the text as it is (so `{context}\n{prompt}` stays text); other fields
    read it as YAML, so that 50 is an int, null is None and [a, b] a list."""
    options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    if raw == "null" and type(None) in options:
        return None
    base = next(o for o in options if o is not type(None))
    if get_origin(base) is Annotated:
        base = get_args(base)[0]
    if base is str and not (raw.startswith("[") and any(get_origin(o) is list for o in options)):
        return str(raw)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return str(raw)


def _set_dotted(data: dict, key: str, value: Any, item: str):
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': {'.'.join(parents[:i + 1])} is not a section")
        node = child
    node[leaf] = value


def _build(cls, data: Any, prefix: str, source: _Source):
    if not isinstance(data, dict):
        source.fail(prefix or "<top level>", f"expected a mapping of fields, got {data!r}")
    hints = get_type_hints(cls, include_extras=True)
    fields = {yaml_key(f.name): f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            source.fail(join_path(prefix, key), f"unknown key{_suggest(str(key), list(fields), prefix)}")
    values = {name: _coerce(data[key], hints[name], join_path(prefix, key), source) for key, name in fields.items() if key in data}
    try:
        return cls(**values)
    except ConfigError as e:  # cross-field problems: add where each field was set
        located = [f"{source.locate(line.partition(':')[0])}: {line}" for line in str(e).splitlines()]
        raise ConfigError("\n".join(located)) from None


def _suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{join_path(prefix, close[0])}'?"
    elsewhere = [path for path, _, _, _ in reference() if path.rpartition(".")[2] == key]
    if elsewhere:
        return f"; did you mean '{elsewhere[0]}'?"
    return f"; valid keys here: {', '.join(names)}"


def _coerce(value: Any, tp: Any, path: str, source: _Source) -> Any:
    if isinstance(value, _OverrideText):
        value = _parse_override_text(value, tp)
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        value = _coerce(value, base, path, source)
        for bound in meta:
            if isinstance(bound, Range) and not bound.contains(value):
                source.fail(path, f"{value!r} is out of range: must be {bound.describe()}")
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if len(options) < len(get_args(tp)):
                return None
            source.fail(path, "must not be null")
        return _coerce(value, _option_for(value, options), path, source)
    if origin is Literal:
        choices = get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        source.fail(path, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if origin is dict:
        if not isinstance(value, dict):
            source.fail(path, f"expected a mapping, got {value!r}")
        _, item_type = get_args(tp)
        return {str(k): _coerce(v, item_type, f"{path}.{k}", source) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            source.fail(path, f"expected a list, got {value!r}")
        (item_type,) = get_args(tp)
        return [_coerce(v, item_type, f"{path}.{i}", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, source)
    return _coerce_scalar(value, tp, path, source)


def _option_for(value: Any, options: list) -> Any:
    """The member of a union that a value's shape asks for: a list for a list, else the first."""
    if isinstance(value, list):
        return next((o for o in options if get_origin(o) is list), options[0])
    return options[0]


def _coerce_scalar(value: Any, tp: type, path: str, source: _Source) -> Any:
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        # YAML 1.1 reads `5e-4` (no dot) as a string; accept what float() reads, nothing looser.
        try:
            number = float(value)
        except (ValueError, OverflowError):
            number = None
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            source.fail(path, f"must be a finite number, got {value!r}")
    if tp is str and isinstance(value, str):
        return value
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]
    source.fail(path, f"expected {kind}, got {value!r} ({type(value).__name__})")
