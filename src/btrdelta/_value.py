"""Slotted value classes without the ``dataclasses`` module, for the start-up path.

``@value_class`` makes what ``@dataclass(slots=True)`` makes from a class body with annotated
fields: ``__slots__``, an ``__init__`` taking the fields in order (with the defaults given
in the body; ``field(default_factory=list)`` makes one per instance), ``__repr__``,
field-by-field ``__eq__`` (instances are unhashable, as with a dataclass),
``__match_args__`` (the field names, in order; :func:`field_names` reads them).
``ClassVar`` annotations are class attributes, not fields. ``@value_class(frozen=True)``
is ``@dataclass(frozen=True, slots=True)``: fields cannot be assigned after ``__init__``,
instances hash by their fields.

Why not ``dataclasses``: importing it pulls in ``inspect``, ``ast``, ``dis`` and
``tokenize``, and it compiles three functions per class. On the path every
``btrdelta receive`` takes (26 record classes) that was ~25 ms of a start-up that
``btrfs receive`` does not have (and ~10 ms of every ``btrdelta send``). Here
``__repr__``/``__eq__`` are shared, and ``__init__`` is compiled once per *shape* (number
of fields, which take a default factory, frozen or not) with placeholder names, then
renamed for each class (``CodeType.replace``: ~1 µs, where a ``compile`` costs ~45 µs; the
~50 value classes of ``btrdelta send`` have ~15 shapes). Type checkers see a dataclass
(``dataclass_transform``).
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from types import CodeType, FunctionType
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["field", "field_names", "value_class"]

_T = TypeVar("_T", bound=type)
_V = TypeVar("_V")


class _Factory:
    """A field's default made per instance (what :func:`field` returns)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], _V]) -> _V:
    """``dataclasses.field(default_factory=...)``: a new default per instance."""
    return _Factory(default_factory)  # type: ignore[return-value]


class FrozenInstanceError(AttributeError):
    """A field of a frozen value class was assigned (``dataclasses.FrozenInstanceError``)."""


def _frozen_setattr(self: Any, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _hash(self: Any) -> int:
    return hash(self._value_key(self)) if self._value_key is not None else 0


def _repr(self: Any) -> str:
    args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__match_args__)
    return f"{type(self).__qualname__}({args})"


def _eq(self: Any, other: Any) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented  # type: ignore[no-any-return]
    key = self._value_key
    return key is None or bool(key(self) == key(other))


@overload
def value_class(cls: _T, /) -> _T: ...


@overload
def value_class(*, frozen: bool = False) -> Callable[[_T], _T]: ...


@dataclass_transform(field_specifiers=(field,))
def value_class(cls: _T | None = None, /, *, frozen: bool = False) -> Any:
    """Turn ``cls`` into a slotted value class (see the module docstring)."""
    if cls is None:
        return lambda c: _make(c, frozen)
    return _make(cls, frozen)


#: compiled ``__init__`` code of each shape: (fields, which take a factory, frozen) -> code
_SHAPES: dict[tuple[int, tuple[bool, ...], bool], CodeType] = {}


def _init_code(count: int, factories: tuple[bool, ...], frozen: bool) -> CodeType:
    """The ``__init__`` code of a shape, its fields named ``f0``, ``f1``, ... (defaults
    ``_d_f0``, ... are globals of the function)."""
    key = (count, factories, frozen)
    code = _SHAPES.get(key)
    if code is None:
        names = [f"f{i}" for i in range(count)]
        lines = []
        for n, made in zip(names, factories, strict=True):
            value = f"_d_{n}.make() if {n} is _d_{n} else {n}" if made else n
            lines.append(f" _set(self, {n!r}, {value})" if frozen else f" self.{n} = {value}")
        source = f"def __init__(self{''.join(', ' + n for n in names)}):\n" \
            + ("\n".join(lines) or " pass")
        scope: dict[str, Any] = {}
        exec(compile(source, "<value_class>", "exec"), scope)
        code = _SHAPES[key] = scope["__init__"].__code__
    return code


def _make(cls: _T, frozen: bool) -> _T:
    body = cls.__dict__
    names = tuple(
        n for n, t in body.get("__annotations__", {}).items()
        if not str(t).startswith(("ClassVar", "typing.ClassVar"))
    )
    defaults = {n: body[n] for n in names if n in body}
    seen_default = False
    for n in names:
        if n in defaults:
            seen_default = True
        elif seen_default:
            raise TypeError(f"{cls.__name__}: field {n} without a default follows one with")
    factories = tuple(isinstance(defaults.get(n), _Factory) for n in names)
    # the shape's code with the placeholders renamed: f<i> -> the field's name (as argument,
    # attribute and, frozen, the name given to object.__setattr__), _d_f<i> -> _d_<name>
    rename = {f"f{i}": n for i, n in enumerate(names)}
    rename.update((f"_d_f{i}", f"_d_{n}") for i, n in enumerate(names))
    template = _init_code(len(names), factories, frozen)
    code = template.replace(
        co_varnames=tuple(rename.get(v, v) for v in template.co_varnames),
        co_names=tuple(rename.get(v, v) for v in template.co_names),
        co_consts=tuple(rename.get(c, c) if isinstance(c, str) else c
                        for c in template.co_consts),
        co_filename=f"<value_class {cls.__qualname__}>",
        co_qualname=f"{cls.__qualname__}.__init__",
    )
    scope: dict[str, Any] = {f"_d_{n}": v for n, v in defaults.items()}
    scope["_set"] = object.__setattr__
    init = FunctionType(code, scope, "__init__",
                        tuple(scope[f"_d_{n}"] for n in names if n in defaults) or None)
    ns = {k: v for k, v in body.items() if k not in names and k not in ("__dict__", "__weakref__")}
    ns.update(
        __slots__=names, __match_args__=names, __init__=init, __repr__=_repr, __eq__=_eq,
        __hash__=None, _value_key=attrgetter(*names) if names else None,
    )
    if frozen:
        ns.update(__setattr__=_frozen_setattr, __delattr__=_frozen_delattr, __hash__=_hash)
    new: _T = type(cls)(cls.__name__, cls.__bases__, ns)
    return new


def field_names(cls: type) -> tuple[str, ...]:
    """The fields of a value class (or of a dataclass), in order."""
    return tuple(cls.__match_args__)  # type: ignore[attr-defined]
