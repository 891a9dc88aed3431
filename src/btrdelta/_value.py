"""Slotted value classes without the ``dataclasses`` module, for the start-up path.

``@value_class`` makes what ``@dataclass(slots=True)`` makes from a class body with annotated
fields: ``__slots__``, an ``__init__`` taking the fields in order (with the defaults given
in the body), ``__repr__``, field-by-field ``__eq__`` (instances are unhashable, as with a
dataclass), ``__match_args__`` (the field names, in order; :func:`field_names` reads them).
``ClassVar`` annotations are class attributes, not fields.

Why not ``dataclasses``: importing it pulls in ``inspect``, ``ast``, ``dis`` and
``tokenize``, and it compiles three functions per class. On the path every
``btrdelta receive`` takes (26 record classes) that was ~25 ms of a start-up that
``btrfs receive`` does not have. Here one ``__init__`` is compiled per class and
``__repr__``/``__eq__`` are shared. Type checkers see a dataclass (``dataclass_transform``).
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, TypeVar, dataclass_transform

__all__ = ["field_names", "value_class"]

_T = TypeVar("_T", bound=type)


def _repr(self: Any) -> str:
    args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__match_args__)
    return f"{type(self).__qualname__}({args})"


def _eq(self: Any, other: Any) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented  # type: ignore[no-any-return]
    key = self._value_key
    return key is None or bool(key(self) == key(other))


@dataclass_transform()
def value_class(cls: _T) -> _T:
    """Turn ``cls`` into a slotted value class (see the module docstring)."""
    body = cls.__dict__
    names = tuple(
        n for n, t in body.get("__annotations__", {}).items()
        if not str(t).startswith(("ClassVar", "typing.ClassVar"))
    )
    defaults = {n: body[n] for n in names if n in body}
    params, seen_default = [], False
    for n in names:
        if n in defaults:
            params.append(f"{n}=_d_{n}")
            seen_default = True
        elif seen_default:
            raise TypeError(f"{cls.__name__}: field {n} without a default follows one with")
        else:
            params.append(n)
    lines = [f" self.{n} = {n}" for n in names] or [" pass"]
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(lines)
    scope: dict[str, Any] = {f"_d_{n}": v for n, v in defaults.items()}
    exec(compile(source, f"<value_class {cls.__qualname__}>", "exec"), scope)
    ns = {k: v for k, v in body.items() if k not in names and k not in ("__dict__", "__weakref__")}
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    ns.update(
        __slots__=names, __match_args__=names, __init__=init, __repr__=_repr, __eq__=_eq,
        __hash__=None, _value_key=attrgetter(*names) if names else None,
    )
    new: _T = type(cls)(cls.__name__, cls.__bases__, ns)
    return new


def field_names(cls: type) -> tuple[str, ...]:
    """The fields of a value class (or of a dataclass), in order."""
    return tuple(cls.__match_args__)  # type: ignore[attr-defined]
