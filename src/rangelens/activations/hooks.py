"""One hook primitive: read or edit a module's input or output during forwards (baukit's ``Trace`` idea).

Capture, interventions and the erasure suffix engine all go through :class:`Trace` (one module) or
:class:`TraceDict` (several). The traced value is the module's first positional input (or its first
keyword argument when it is called with keywords only), or its output (element 0 of a tuple/list output).
``edit`` replaces that value; with ``context=True`` it also receives the :class:`ForwardContext` of
the forward of the model the trace was made on (its keyword arguments, e.g. the attention mask, as
TransformerLens hooks get theirs). ``stop`` ends the forward once every traced module has fired
(catch it with :func:`stop_forward`). Hooks are always removed on exit, even if the forward raises.
This module is the only place rangelens registers hooks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, suppress
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from rangelens.errors import RangelensError

Edit = Callable[..., torch.Tensor]  # (value) or, with context=True, (value, ForwardContext)


class ForwardContext:
    """The forward in progress of the model a :class:`Trace` was made on: its arguments by name
    (positional ones mapped through ``forward``'s signature); ``active`` only inside that forward."""

    def __init__(self, model: nn.Module) -> None:
        self._names = list(inspect.signature(model.forward).parameters)
        self.kwargs: dict[str, Any] = {}
        self.active = False

    def start(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.kwargs = {**dict(zip(self._names, args, strict=False)), **kwargs}
        self.active = True

    def end(self, *_args: object) -> None:
        self.kwargs = {}
        self.active = False

    def tensor(self, name: str) -> torch.Tensor | None:
        """A tensor argument of the forward (None when absent or not a tensor)."""
        value = self.kwargs.get(name)
        return value if isinstance(value, torch.Tensor) else None


class StopForward(Exception):
    """Raised by a stopping trace to end the forward early (TransformerLens' ``stop_at_layer``)."""


def stop_forward() -> AbstractContextManager[None]:
    """Swallow the early stop raised by a ``stop=True`` trace."""
    return suppress(StopForward)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``; a one-line error for an empty or unknown path."""
    if not path:
        raise RangelensError("empty module path; give a dotted path from model.named_modules()")
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise RangelensError(
            f"module {path!r} not found in the model; see model.named_modules()"
        ) from err


def _tensor(value: object, path: str, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise RangelensError(
            f"the {where} of module {path!r} is a {type(value).__name__}, not a tensor; choose a "
            f"module whose {where} is a tensor (e.g. 'module:{path}:input' or a Linear)"
        )
    return value


class Trace:
    """Read (``.value``) or ``edit`` the input or output of the module at ``path`` while active.

    ``value`` holds the tensor of the latest forward (after the edit). ``on_fire`` is called after each
    firing (used by :class:`TraceDict` to stop once all modules fired).
    """

    def __init__(
        self,
        model: nn.Module,
        path: str,
        *,
        input: bool = False,
        edit: Edit | None = None,
        stop: bool = False,
        retain: bool = True,
        on_fire: Callable[[], None] | None = None,
        context: bool = False,
    ) -> None:
        self.model = model
        self.module = get_module(model, path)
        self.path = path
        self.input = input
        self.edit = edit
        self.stop = stop
        self.retain = retain
        self.on_fire = on_fire
        self.value: torch.Tensor | None = None
        self.output: object = None  # the module's whole output (tuple/tensor) when retained
        self.context = ForwardContext(model) if context else None
        self._handles: list[RemovableHandle] = []

    def _fire(self, x: object) -> torch.Tensor:
        t = _tensor(x, self.path, "input" if self.input else "output")
        if self.edit is not None and self.context is not None:
            t = self.edit(t, self.context)  # inactive when a submodule was called directly
        elif self.edit is not None:
            t = self.edit(t)
        if self.retain:
            self.value = t
        return t

    def _after(self) -> None:
        if self.on_fire is not None:
            self.on_fire()
        if self.stop:
            raise StopForward

    def _pre_hook(
        self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        result: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        if args or not kwargs:
            new = self._fire(args[0] if args else None)
            if self.edit is not None:
                result = ((new, *args[1:]), kwargs)
        else:  # called with keywords only: the first keyword argument
            key = next(iter(kwargs))
            new = self._fire(kwargs[key])
            if self.edit is not None:
                result = (args, {**kwargs, key: new})
        self._after()
        return result

    def _hook(self, _m: nn.Module, _args: tuple[Any, ...], out: object) -> object:
        seq = isinstance(out, tuple | list)
        new = self._fire(out[0] if seq and out else out)  # type: ignore[index]
        if self.retain:
            self.output = out
        result: object = None
        if self.edit is not None:
            result = (new, *out[1:]) if seq else new  # type: ignore[index]
            if isinstance(out, list):
                result = list(result)  # type: ignore[call-overload]
        self._after()
        return result

    def __enter__(self) -> Trace:
        if self.context is not None:
            self._handles += [
                self.model.register_forward_pre_hook(self.context.start, with_kwargs=True),
                self.model.register_forward_hook(self.context.end, always_call=True),
            ]
        if self.input:
            self._handles.append(
                self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            )
        else:
            self._handles.append(self.module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class TraceDict(Mapping[str, Trace]):
    """Several traces by name: ``{name: (path, input)}``; with ``stop``, the forward ends once every
    module has fired (no layer after the deepest one runs). Call :meth:`clear` between forwards."""

    def __init__(
        self,
        model: nn.Module,
        points: Mapping[str, tuple[str, bool]],
        *,
        stop: bool = False,
        edits: Mapping[str, Edit] | None = None,
    ) -> None:
        self._fired: set[str] = set()
        self._stop = stop
        self._traces = {
            name: Trace(
                model,
                path,
                input=inp,
                edit=(edits or {}).get(name),
                on_fire=lambda name=name: self._on_fire(name),  # type: ignore[misc]
            )
            for name, (path, inp) in points.items()
        }
        self._stack = ExitStack()

    def _on_fire(self, name: str) -> None:
        self._fired.add(name)
        if self._stop and len(self._fired) == len(self._traces):
            raise StopForward

    def clear(self) -> None:
        """Forget the previous forward's values."""
        self._fired.clear()
        for t in self._traces.values():
            t.value = None
            t.output = None

    def __getitem__(self, name: str) -> Trace:
        return self._traces[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._traces)

    def __len__(self) -> int:
        return len(self._traces)

    def __enter__(self) -> TraceDict:
        with ExitStack() as stack:
            for t in self._traces.values():
                stack.enter_context(t)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stack.close()
