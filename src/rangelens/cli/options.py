"""The one adapter from config models to CLI options: every field becomes ``--field-name`` with the
field's help and default, so an option is declared once (in :mod:`rangelens.config`) and the CLI,
the YAML config and the Python API read the same declaration.

Options default to "not given" on the command line, so the command passes only what the user
typed and the model applies its own default (shown in the help). Booleans become ``--x/--no-x``;
everything else is read as text and validated and coerced by the model itself, so a bad value gets
the model's one-line error. Optional fields take ``none``; list fields take comma-separated values.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

NONE = "none"
SWITCHES = {
    "force": ("--force", "replace --out even if it holds another kind of rangelens output"),
    "quiet": ("--quiet/-q", "no progress bars or stage lines"),
}


def _args(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation)


def _is_optional(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    union = origin is typing.Union or origin is types.UnionType
    return union and type(None) in _args(annotation)


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(a) is list for a in [annotation, *_args(annotation)])


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (_is_optional(annotation) and bool in _args(annotation))


def _literal(annotation: Any) -> tuple[Any, ...]:
    for a in [annotation, *_args(annotation)]:
        if typing.get_origin(a) is typing.Literal:
            return _args(a)
        if _is_list(a):
            found = _literal(_args(a)[0]) if _args(a) else ()
            if found:
                return found
    return ()


def default_text(value: Any) -> str:
    """A default as the command line spells it (what the help shows)."""
    if value is None:
        return NONE
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or "[]"
    return str(value).encode("unicode_escape").decode("ascii")  # a newline shows as \n


def field_help(field: FieldInfo, origin: str | None = None) -> str:
    """The help of one option: the field's description, its choices, how to spell lists and
    none, and its default (``origin``: where a value not given comes from, e.g. "the run's")."""
    annotation = field.annotation
    text = field.description or ""
    valid = _literal(annotation)
    if valid and "|" not in text:
        text = f"{text} ({' | '.join(str(v) for v in valid)})".strip()
    if _is_list(annotation):
        text += " [comma-separated]"
    if _is_optional(annotation) and not _is_bool(annotation):
        text += f" ['{NONE}' for none]"
    default = default_text(field.get_default(call_default_factory=True))
    shown = f"{origin}, else {default}" if origin else default
    return f"{text} [default: {shown}]".strip()


def metavar(annotation: Any) -> str:
    """One placeholder vocabulary for every command: INT, FLOAT, PATH, LIST, CHOICE, TEXT."""
    inner = [a for a in [annotation, *_args(annotation)] if a is not type(None)]
    if _literal(annotation):
        return "LIST" if _is_list(annotation) else "CHOICE"
    if _is_list(annotation):
        return "LIST"
    for kind, label in ((int, "INT"), (float, "FLOAT"), (Path, "PATH")):
        if kind in inner:
            return label
    return "TEXT"


def flags(name: str, field: FieldInfo) -> tuple[str, ...]:
    """The option's spellings: ``--name`` (``--name/--no-name`` for booleans) and a short flag
    declared on the field (``json_schema_extra={"short": "-o"}``)."""
    flag = name.replace("_", "-")
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    short = extra.get("short")
    if _is_bool(field.annotation):
        return (f"--{flag}/--no-{flag}",)
    return (f"--{flag}", str(short)) if short else (f"--{flag}",)


def fields_of(models: Sequence[type[BaseModel]]) -> dict[str, tuple[type[BaseModel], FieldInfo]]:
    """Every field of ``models`` by name (first model wins; a clash is a programming error)."""
    out: dict[str, tuple[type[BaseModel], FieldInfo]] = {}
    for model in models:
        for name, field in model.model_fields.items():
            if name in out and out[name][1] is not field:
                owner = out[name][0].__name__
                raise TypeError(f"option {name!r} is declared by {owner} and {model.__name__}")
            out.setdefault(name, (model, field))
    return out


def parameters(
    models: Sequence[type[BaseModel]], origins: Mapping[str, str] | None = None
) -> list[inspect.Parameter]:
    """One keyword parameter per field, annotated as a typer option defaulting to "not given"."""
    params = []
    for name, (_model, field) in fields_of(models).items():
        origin = (origins or {}).get(name)
        typ: Any = bool | None if _is_bool(field.annotation) else str | None
        option = typer.Option(
            *flags(name, field),
            help=field_help(field, origin),
            metavar=None if _is_bool(field.annotation) else metavar(field.annotation),
            show_default=False,
        )
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[typ, option],
            )
        )
    return params


def parse(models: Sequence[type[BaseModel]], values: Mapping[str, Any]) -> dict[str, Any]:
    """CLI text -> field values (``none`` -> None, comma lists -> lists); options not given are
    left out, so the model's default (or the run's / config's value) applies."""
    known = fields_of(models)
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known or value is None:
            continue
        annotation = known[name][1].annotation
        if isinstance(value, str):
            if value.strip().lower() == NONE and _is_optional(annotation):
                out[name] = None
                continue
            if _is_list(annotation):
                out[name] = [v.strip() for v in value.split(",") if v.strip()]
                continue
        out[name] = value
    return out


def switch(name: str) -> inspect.Parameter:
    """A pure command-line switch (``--force``, ``--quiet``): not an option of any config."""
    spelled, help_text = SWITCHES[name]
    names = spelled.split("/")
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[bool, typer.Option(*names, help=help_text)],
    )


def command(
    body: Callable[..., None],
    models: Sequence[type[BaseModel]],
    *,
    arguments: Sequence[inspect.Parameter] = (),
    switches: Sequence[str] = (),
    origins: Mapping[str, str] | None = None,
) -> Callable[..., None]:
    """A typer command: ``arguments`` (positional), then every field of ``models`` as an option,
    then ``switches``. ``body`` receives ``(given, **arguments_and_switches)`` with ``given`` the
    parsed values of the options the user gave. ``origins`` names where an option's value comes
    from when not given (for the help), e.g. ``{"model": "the run's"}``."""
    options = parameters(models, origins)
    names = {p.name for p in options}

    def run(**kwargs: Any) -> None:
        given = {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        body(parse(models, given), **rest)

    params = [*arguments, *options, *(switch(s) for s in switches)]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = body.__doc__
    run.__name__ = body.__name__
    return run


def argument(name: str, typ: Any, help_text: str) -> inspect.Parameter:
    """A positional argument (a config file, a run directory)."""
    return inspect.Parameter(
        name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[
            typ, typer.Argument(help=help_text, show_default=False, metavar=name.upper())
        ],
    )
