"""The configuration reference in docs/configuration.md, written from the schema itself.

`python -m conf.reference` prints it; a test checks that the document holds exactly this, so the
reference cannot drift from what the loader accepts.
"""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from conf.schema import PipelineConfig

BEGIN = "<!-- reference: python -m conf.reference -->"
END = "<!-- end of reference -->"


def _section_type(annotation: typing.Any) -> type[BaseModel] | None:
    """The section model behind a field (a model, or a list of models), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(annotation: typing.Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(f"`{json.dumps(value)}`" for value in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    parts = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(parts[0])
    if typing.get_origin(annotation) is list:
        return f"list of {_type_name(parts[0])}"
    if str(typing.get_origin(annotation)) in {"typing.Union", "<class 'types.UnionType'>"}:
        return " or ".join(_type_name(part) for part in parts)
    return str(annotation).replace("typing.", "").replace("NoneType", "null").replace("|", "or")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return ""
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return f"`{json.dumps(value, default=str)}`"


def _cell(text: str | None) -> str:
    """Text for one table cell: one line, pipes escaped."""
    return " ".join((text or "").split()).replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section_type(field.annotation)
        if section is not None and typing.get_origin(field.annotation) is list:
            rows.append(
                f"| `{key}` | list of {section.__name__} | {_default(field)} | "
                f"{_cell(field.description or section.__doc__)} |"
            )
            rows += _rows(section, f"{key}[].")
        elif section is not None:
            rows += _rows(section, f"{key}.")
        else:
            rows.append(
                f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} "
                f"| {_cell(field.description)} |"
            )
    return rows


def reference() -> str:
    """Every key of the config tree as one markdown table per section."""
    blocks = [BEGIN]
    top = [
        f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | |"
        for name, field in PipelineConfig.model_fields.items()
        if _section_type(field.annotation) is None
    ]
    if top:
        blocks += [
            "",
            "### Top level",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        blocks += top
    for name, field in PipelineConfig.model_fields.items():
        section = _section_type(field.annotation)
        if section is None:
            continue
        blocks += ["", f"### `{name}`", ""]
        if section.__doc__:
            blocks += [section.__doc__.strip().split("\n")[0], ""]
        blocks += ["| key | type | default | meaning |", "|---|---|---|---|"]
        blocks += _rows(section, f"{name}.")
    blocks += ["", END]
    return "\n".join(blocks) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
