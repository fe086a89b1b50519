"""CLI options generated from pydantic config models: every field becomes ``--field-name`` with the
field's default and description, so nothing is stated twice and no field is missing from the CLI.

Booleans become ``--x/--no-x`` flags; everything else is read as text and validated (and coerced) by the
config model itself, so a bad value gets the model's one-line error. Optional fields take ``none``;
list fields take comma-separated values.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

NONE = "none"


def _args(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation)


def _is_optional(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    union = origin is typing.Union or origin is types.UnionType
    return union and type(None) in _args(annotation)


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(a) is list for a in [annotation, *_args(annotation)])


def _help(field: FieldInfo, annotation: Any) -> str:
    text = field.description or ""
    literals = [
        a for a in [annotation, *_args(annotation)] if typing.get_origin(a) is typing.Literal
    ]
    if literals and "|" not in text:
        text = f"{text} ({' | '.join(str(v) for v in _args(literals[0]))})".strip()
    if _is_list(annotation):
        text += " [comma-separated]"
    if _is_optional(annotation):
        text += f" ['{NONE}' for none]"
    return text


def _metavar(annotation: Any) -> str:
    inner = [a for a in [annotation, *_args(annotation)] if a is not type(None)]
    for kind, label in ((int, "INT"), (float, "FLOAT")):
        if kind in inner:
            return label
    if any(typing.get_origin(a) is typing.Literal for a in inner):
        return "CHOICE"
    return "LIST" if _is_list(annotation) else "TEXT"


def _text_default(value: Any) -> str:
    if value is None:
        return NONE
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def option_names(config: type[BaseModel], skip: Sequence[str] = ()) -> list[str]:
    """The ``--options`` generated for ``config`` (for docs and the report to the user)."""
    return [f"--{n.replace('_', '-')}" for n in config.model_fields if n not in skip]


def parameters(
    config: type[BaseModel], skip: Sequence[str] = (), defaults: dict[str, Any] | None = None
) -> list[inspect.Parameter]:
    """One keyword parameter per config field, annotated as a typer option.

    ``defaults`` overrides a field's default on this command (e.g. None: "take it from the run").
    """
    params = []
    for name, field in config.model_fields.items():
        if name in skip:
            continue
        annotation = field.annotation
        default = (defaults or {}).get(name, field.get_default(call_default_factory=True))
        help_text = _help(field, annotation)
        if defaults and name in defaults and defaults[name] is None:
            fallback = _text_default(field.get_default(call_default_factory=True))
            help_text += f" (default: the run's, else {fallback})"
        is_bool = annotation is bool or (_is_optional(annotation) and bool in _args(annotation))
        if is_bool and default is not None:
            typ: Any = bool
            value: Any = default
        else:
            typ, value = str | None, _text_default(default)
            if defaults and name in defaults and default is None:
                value = None  # not given: the command fills it in
        flag = name.replace("_", "-")
        if typ is bool:
            option = typer.Option(f"--{flag}/--no-{flag}", help=help_text)
        else:
            metavar = "BOOL" if is_bool else _metavar(annotation)
            option = typer.Option(f"--{flag}", help=help_text, metavar=metavar)
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=value,
                annotation=Annotated[typ, option],
            )
        )
    return params


def parse(config: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """CLI text -> field values for ``config`` (``none`` -> None, comma lists -> lists); fields left
    unset (None) are omitted so the model's default applies."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        field = config.model_fields.get(name)
        if field is None or value is None:
            continue
        if isinstance(value, str):
            if value.strip().lower() == NONE and _is_optional(field.annotation):
                out[name] = None
                continue
            if _is_list(field.annotation):
                out[name] = [v.strip() for v in value.split(",") if v.strip()]
                continue
        out[name] = value
    return out


def command(
    config: type[BaseModel],
    body: Callable[..., None],
    *,
    extra: Sequence[inspect.Parameter] = (),
    skip: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
) -> Callable[..., None]:
    """A typer command whose options are ``config``'s fields plus ``extra``; ``body`` receives
    ``(fields, **extra_values)`` with ``fields`` the parsed field values (see :func:`parse`)."""
    fields = parameters(config, skip, defaults)
    names = {p.name for p in fields}

    def run(**kwargs: Any) -> None:
        given = {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        body(parse(config, given), **rest)

    run.__signature__ = inspect.Signature([*fields, *extra])  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in [*fields, *extra]}
    run.__doc__ = body.__doc__
    run.__name__ = body.__name__
    return run


def with_config(
    config: type[BaseModel], name: str, *, defaults: dict[str, Any] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace ``func``'s parameter ``name`` by ``config``'s fields as options; ``func`` receives the
    parsed field values (a dict, see :func:`parse`) as ``name``."""

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        own = [
            p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != name
        ]
        fields = parameters(config, defaults=defaults)
        names = {p.name for p in fields}

        def run(**kwargs: Any) -> Any:
            given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return func(**kwargs, **{name: parse(config, given)})

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + fields
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        run.__doc__ = func.__doc__
        run.__name__ = func.__name__
        return run

    return wrap


def option(name: str, typ: Any, default: Any, help_text: str, *flags: str) -> inspect.Parameter:
    """An extra (non-config) option, e.g. ``--out`` or ``--progress``."""
    flag = name.replace("_", "-")
    names = flags or ((f"--{flag}/--no-{flag}",) if typ is bool else (f"--{flag}",))
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[typ, typer.Option(*names, help=help_text)],
    )
