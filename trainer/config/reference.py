"""The options' documentation, generated from the field docstrings: `selfdistill config
--reference` and the README's config table."""

import ast
import dataclasses
import inspect
import textwrap
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from trainer.config.sections import Config, Range, join_path, yaml_key

# ----------------------------------------------------------------------------------------------
# Documentation, generated from the field docstrings
# ----------------------------------------------------------------------------------------------

def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def reference(cls=Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(field path, type, default, doc) for every leaf field, in declaration order."""
    rows = []
    hints = get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        path = join_path(prefix, yaml_key(f.name))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(reference(hints[f.name], path))
            continue
        rows.append((path, _type_name(hints[f.name]), _default_text(default), docs.get(f.name, "")))
        origin = get_origin(hints[f.name])
        item = get_args(hints[f.name])[-1] if origin in (list, dict) else None
        if dataclasses.is_dataclass(item):  # a list or mapping of sections (stages, teachers): an item's fields
            rows.extend(reference(item, f"{path}[]" if origin is list else f"{path}.<task>"))
    return rows


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        bounds = " ".join(m.describe() for m in meta if isinstance(m, Range))
        return f"{_type_name(base)} ({bounds})" if bounds else _type_name(base)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(str(c) for c in get_args(tp))
    if origin is list:
        item = get_args(tp)[0]
        return "list of sections" if dataclasses.is_dataclass(item) else f"list[{_type_name(item)}]"
    if origin is dict:
        item = get_args(tp)[-1]
        return "mapping of sections" if dataclasses.is_dataclass(item) else f"mapping to {_type_name(item)}"
    return "null" if tp is type(None) else tp.__name__


def _default_text(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 40 else "(see `selfdistill config --reference`)"


def reference_markdown() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, type_name, default, doc in reference():
        rows.append(f"| `{path}` | {type_name.replace('|', '&#124;')} | `{default}` | {doc.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"
