"""Slotted value classes without the ``dataclasses`` module, for the start-up path.

``@value_class`` makes what ``@dataclass(slots=True)`` makes from a class body with annotated
fields: ``__slots__``, an ``__init__`` taking the fields in order (with the defaults given
in the body; ``field(default_factory=list)`` makes one per instance), ``__repr__``,
field-by-field ``__eq__`` (instances are unhashable, as with a dataclass),
``__match_args__`` (the field names, in order; :func:`field_names` reads them); a
``__post_init__`` of the body is called after the fields are set; :func:`replace` is
``dataclasses.replace``.
``ClassVar`` annotations are class attributes, not fields. ``@value_class(frozen=True)``
is ``@dataclass(frozen=True, slots=True)``: fields cannot be assigned after ``__init__``,
instances hash by their fields.

Why not ``dataclasses``: importing it pulls in ``inspect``, ``ast``, ``dis`` and
``tokenize``, and it compiles three functions per class. On the path every
``btrdelta receive`` takes (26 record classes) that was ~25 ms of a start-up that
``btrfs receive`` does not have (and ~10 ms of every ``btrdelta send``). Here
``__repr__``/``__eq__`` are shared, and ``__init__`` is made once per *shape* (number of
fields, which take a default factory, frozen or not) with placeholder names, then renamed
for each class (``CodeType.replace``: ~1 µs). The shapes of btrdelta's own classes are
written out at the end of this module (``scripts/gen_value_shapes.py``), so they come with
its byte code; another shape is compiled when first used (~0.15 ms: the 16 shapes of a
``btrdelta send`` were 2-3 ms of its start). Type checkers see a dataclass
(``dataclass_transform``).

``class Point(Value)`` (``class Point(Value, frozen=True)``) makes the same class in one go:
its metaclass makes the slotted class from the class body, where the decorator makes the
class again from the class the ``class`` statement made (a ``send --from-sendshot`` makes
41 value classes: 1.3 M instructions, ~0.3 %, of a small one). btrdelta's own classes are
``Value`` subclasses, but for the stream records ``Write`` and ``EncodedWrite``, which
``delta.patching`` subclasses with one more slot.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from operator import attrgetter, itemgetter
from types import CodeType, FunctionType

from . import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, TypeVar, dataclass_transform, overload

    _T = TypeVar("_T", bound=type)
    _V = TypeVar("_V")
else:
    # (``typing`` is not imported on the start-up path: this marks the function and the
    # metaclass for type checkers only)
    def dataclass_transform(**_kwargs: object) -> Callable[[object], object]:
        return lambda f: f

#: namedtuple's field accessor (its fallback, a property, where ``collections`` has none)
_tuplegetter: Any = getattr(collections, "_tuplegetter", None) or (
    lambda index, doc: property(itemgetter(index), doc=doc))

__all__ = ["Value", "field", "field_names", "named_tuple", "replace", "value_class"]


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


if TYPE_CHECKING:
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


Shape = tuple[int, tuple[bool, ...], bool]
#: ``__init__`` code of each shape used so far: (fields, which take a factory, frozen) -> code
_SHAPES: dict[Shape, CodeType] = {}


def shape_name(shape: Shape) -> str:
    """The name of a shape's function in the generated code below (``_init3_010``:
    3 fields, the second made by a factory; ``_frozen...``: frozen)."""
    count, factories, frozen = shape
    return f"_{'frozen' if frozen else 'init'}{count}_{''.join('01'[f] for f in factories)}"


def shape_source(shape: Shape, *, typed: bool = False) -> str:
    """The source of a shape's ``__init__``, its fields named ``f0``, ``f1``, ... (defaults
    ``_d_f0``, ... and ``_set`` are globals of the function, given per class by
    :func:`_make`); ``typed``: as written in the generated code below."""
    count, factories, frozen = shape
    names = [f"f{i}" for i in range(count)]
    lines = []
    for n, made in zip(names, factories, strict=True):
        value = f"_d_{n}.make() if {n} is _d_{n} else {n}" if made else n
        lines.append(f"    _set(self, {n!r}, {value})" if frozen else f"    self.{n} = {value}")
    body = "\n".join(lines) or "    pass"
    if not typed:
        return f"def __init__(self{''.join(', ' + n for n in names)}):\n{body}\n"
    args = ["self: Any", *(f"{n}: Any" for n in names)]
    head = f"def {shape_name(shape)}({', '.join(args)}) -> None:"
    if len(head) > 100:
        rows = [", ".join(args[i:i + 8]) for i in range(0, len(args), 8)]
        head = f"def {shape_name(shape)}(\n" + ",\n".join(f"    {r}" for r in rows) \
            + ",\n) -> None:"
    return f"{head}\n{body}\n"


def _init_code(shape: Shape) -> CodeType:
    """The ``__init__`` code of a shape: generated ahead (below) for the shapes of
    btrdelta's own classes, else compiled now (~0.15 ms each: the ~16 shapes of a
    ``btrdelta send`` cost 2-3 ms of its start when each was compiled here)."""
    code = _SHAPES.get(shape)
    if code is None:
        made = _GENERATED.get(shape_name(shape))
        if made is not None:
            code = made.__code__
        else:
            scope: dict[str, Any] = {}
            exec(compile(shape_source(shape), "<value_class>", "exec"), scope)
            code = scope["__init__"].__code__
        _SHAPES[shape] = code
    return code


def _slotted(name: str, qualname: str, body: Mapping[str, Any], frozen: bool
             ) -> dict[str, Any]:
    """The namespace of the slotted value class made from the class body ``body``."""
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
            raise TypeError(f"{name}: field {n} without a default follows one with")
    factories = tuple(isinstance(defaults.get(n), _Factory) for n in names)
    # the shape's code with the placeholders renamed: f<i> -> the field's name (as argument,
    # attribute and, frozen, the name given to object.__setattr__), _d_f<i> -> _d_<name>
    rename = {f"f{i}": n for i, n in enumerate(names)}
    rename.update((f"_d_f{i}", f"_d_{n}") for i, n in enumerate(names))
    template = _init_code((len(names), factories, frozen))
    code = template.replace(
        co_varnames=tuple(rename.get(v, v) for v in template.co_varnames),
        co_names=tuple(rename.get(v, v) for v in template.co_names),
        co_consts=tuple(rename.get(c, c) if isinstance(c, str) else c
                        for c in template.co_consts),
        co_filename=f"<value_class {qualname}>",
        co_name="__init__",
        co_qualname=f"{qualname}.__init__",
    )
    scope: dict[str, Any] = {f"_d_{n}": v for n, v in defaults.items()}
    scope["_set"] = object.__setattr__
    init: Callable[..., None] = FunctionType(code, scope, "__init__",
                        tuple(scope[f"_d_{n}"] for n in names if n in defaults) or None)
    if "__post_init__" in body:
        init = _with_post_init(init, qualname)
    ns = {k: v for k, v in body.items() if k not in names and k not in ("__dict__", "__weakref__")}
    ns.update(
        __slots__=names, __match_args__=names, __init__=init, __repr__=_repr, __eq__=_eq,
        __hash__=None, _value_key=attrgetter(*names) if names else None,
    )
    if frozen:
        ns.update(__setattr__=_frozen_setattr, __delattr__=_frozen_delattr, __hash__=_hash)
    return ns


def _with_post_init(init: Callable[..., None], qualname: str) -> Callable[..., None]:
    """``init``, then the instance's ``__post_init__()`` (a dataclass's: it may check the
    fields and raise)."""
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.__post_init__()

    __init__.__qualname__ = f"{qualname}.__init__"
    return __init__


def replace(obj: _V, /, **changes: Any) -> _V:
    """``dataclasses.replace``: a new instance of ``obj``'s value class with ``changes``
    to its fields."""
    for n in field_names(type(obj)):
        if n not in changes:
            changes[n] = getattr(obj, n)
    return type(obj)(**changes)


def _make(cls: _T, frozen: bool) -> _T:
    """``@value_class``: the class made again, slotted (:class:`Value` makes it once)."""
    new: _T = type(cls)(cls.__name__, cls.__bases__,
                        _slotted(cls.__name__, cls.__qualname__, cls.__dict__, frozen))
    return new


@dataclass_transform(field_specifiers=(field,))
class _ValueType(type):
    """The metaclass of :class:`Value`: a direct subclass's body becomes the slotted value
    class in one ``type.__new__`` (a subclass of a value class is made as it is written)."""

    def __new__(mcls, name: str, bases: tuple[type, ...], body: dict[str, Any], *,
                frozen: bool = False) -> _ValueType:
        if bases and bases == (Value,):  # (Value itself has none)
            body = _slotted(name, body["__qualname__"], body, frozen)
        elif frozen:
            raise TypeError(f"{name}: only a direct subclass of Value takes frozen=True")
        return super().__new__(mcls, name, bases, body)


class Value(metaclass=_ValueType):
    """The base of a value class made in one go: ``class Point(Value)`` (``class
    Point(Value, frozen=True)``) is ``@value_class`` (``@value_class(frozen=True)``) without
    the class made twice: by the ``class`` statement, then again slotted (~15 µs a class,
    65 classes in btrdelta, 43 of them on the path of a ``send``)."""

    __slots__ = ()


def named_tuple(name: str, new: Callable[..., tuple[Any, ...]], module: str) -> type:
    """``collections.namedtuple(name, fields, defaults=...)`` from its ``__new__``, written
    out (``def new(_cls, a, b=0): return tuple.__new__(_cls, (a, b))``: the fields are its
    parameters): namedtuple compiles that function at each call (~30 µs, three on the path
    of a ``send``). Fields by name and index, ``_fields``, repr and pickling as
    namedtuple's; not its ``_make``/``_replace``/``_asdict``."""
    code = new.__code__
    names = code.co_varnames[1:code.co_argcount]
    new.__name__ = new.__qualname__ = "__new__"
    body: dict[str, Any] = {
        "__slots__": (), "__module__": module, "_fields": names, "__match_args__": names,
        "__new__": new, "__repr__": _tuple_repr, "__getnewargs__": _getnewargs,
    }
    body.update((n, _tuplegetter(i, f"Alias for field number {i}")) for i, n in enumerate(names))
    return type(name, (tuple,), body)


def _tuple_repr(self: Any) -> str:
    args = ", ".join(f"{n}={v!r}" for n, v in zip(self._fields, self, strict=True))
    return f"{type(self).__name__}({args})"


def _getnewargs(self: Any) -> tuple[Any, ...]:
    return tuple(self)


def field_names(cls: type) -> tuple[str, ...]:
    """The fields of a value class (or of a dataclass), in order."""
    return tuple(cls.__match_args__)  # type: ignore[attr-defined]


# --- generated by scripts/gen_value_shapes.py (the shapes of btrdelta's value classes;
# a test runs it with --check): do not edit ----------------------------------------------
# the functions' globals are given per class by _make: these stand in for them here
_set: Any = object.__setattr__
_d_f0: Any = None
_d_f1: Any = None
_d_f2: Any = None
_d_f3: Any = None
_d_f4: Any = None
_d_f5: Any = None
_d_f6: Any = None
_d_f7: Any = None
_d_f8: Any = None
_d_f9: Any = None
_d_f10: Any = None
_d_f12: Any = None
_d_f13: Any = None


def _init0_(self: Any) -> None:
    pass


def _init1_0(self: Any, f0: Any) -> None:
    self.f0 = f0


def _frozen1_0(self: Any, f0: Any) -> None:
    _set(self, 'f0', f0)


def _init2_00(self: Any, f0: Any, f1: Any) -> None:
    self.f0 = f0
    self.f1 = f1


def _frozen2_00(self: Any, f0: Any, f1: Any) -> None:
    _set(self, 'f0', f0)
    _set(self, 'f1', f1)


def _init3_000(self: Any, f0: Any, f1: Any, f2: Any) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2


def _frozen3_000(self: Any, f0: Any, f1: Any, f2: Any) -> None:
    _set(self, 'f0', f0)
    _set(self, 'f1', f1)
    _set(self, 'f2', f2)


def _init3_001(self: Any, f0: Any, f1: Any, f2: Any) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = _d_f2.make() if f2 is _d_f2 else f2


def _init3_111(self: Any, f0: Any, f1: Any, f2: Any) -> None:
    self.f0 = _d_f0.make() if f0 is _d_f0 else f0
    self.f1 = _d_f1.make() if f1 is _d_f1 else f1
    self.f2 = _d_f2.make() if f2 is _d_f2 else f2


def _init4_0000(self: Any, f0: Any, f1: Any, f2: Any, f3: Any) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3


def _frozen4_0000(self: Any, f0: Any, f1: Any, f2: Any, f3: Any) -> None:
    _set(self, 'f0', f0)
    _set(self, 'f1', f1)
    _set(self, 'f2', f2)
    _set(self, 'f3', f3)


def _init5_00000(self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4


def _frozen5_00000(self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any) -> None:
    _set(self, 'f0', f0)
    _set(self, 'f1', f1)
    _set(self, 'f2', f2)
    _set(self, 'f3', f3)
    _set(self, 'f4', f4)


def _init5_00001(self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = _d_f4.make() if f4 is _d_f4 else f4


def _init5_00010(self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = _d_f3.make() if f3 is _d_f3 else f3
    self.f4 = f4


def _init5_01111(self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any) -> None:
    self.f0 = f0
    self.f1 = _d_f1.make() if f1 is _d_f1 else f1
    self.f2 = _d_f2.make() if f2 is _d_f2 else f2
    self.f3 = _d_f3.make() if f3 is _d_f3 else f3
    self.f4 = _d_f4.make() if f4 is _d_f4 else f4


def _init6_000000(self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = f5


def _frozen6_000000(self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any) -> None:
    _set(self, 'f0', f0)
    _set(self, 'f1', f1)
    _set(self, 'f2', f2)
    _set(self, 'f3', f3)
    _set(self, 'f4', f4)
    _set(self, 'f5', f5)


def _init6_000001(self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = _d_f5.make() if f5 is _d_f5 else f5


def _init6_001111(self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = _d_f2.make() if f2 is _d_f2 else f2
    self.f3 = _d_f3.make() if f3 is _d_f3 else f3
    self.f4 = _d_f4.make() if f4 is _d_f4 else f4
    self.f5 = _d_f5.make() if f5 is _d_f5 else f5


def _init7_0000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = f5
    self.f6 = f6


def _frozen7_0000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
) -> None:
    _set(self, 'f0', f0)
    _set(self, 'f1', f1)
    _set(self, 'f2', f2)
    _set(self, 'f3', f3)
    _set(self, 'f4', f4)
    _set(self, 'f5', f5)
    _set(self, 'f6', f6)


def _init8_00000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = f5
    self.f6 = f6
    self.f7 = f7


def _init8_00001111(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = _d_f4.make() if f4 is _d_f4 else f4
    self.f5 = _d_f5.make() if f5 is _d_f5 else f5
    self.f6 = _d_f6.make() if f6 is _d_f6 else f6
    self.f7 = _d_f7.make() if f7 is _d_f7 else f7


def _init9_000000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = f5
    self.f6 = f6
    self.f7 = f7
    self.f8 = f8


def _frozen9_000000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any,
) -> None:
    _set(self, 'f0', f0)
    _set(self, 'f1', f1)
    _set(self, 'f2', f2)
    _set(self, 'f3', f3)
    _set(self, 'f4', f4)
    _set(self, 'f5', f5)
    _set(self, 'f6', f6)
    _set(self, 'f7', f7)
    _set(self, 'f8', f8)


def _init10_0000000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any, f9: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = f5
    self.f6 = f6
    self.f7 = f7
    self.f8 = f8
    self.f9 = f9


def _init10_0011110110(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any, f9: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = _d_f2.make() if f2 is _d_f2 else f2
    self.f3 = _d_f3.make() if f3 is _d_f3 else f3
    self.f4 = _d_f4.make() if f4 is _d_f4 else f4
    self.f5 = _d_f5.make() if f5 is _d_f5 else f5
    self.f6 = f6
    self.f7 = _d_f7.make() if f7 is _d_f7 else f7
    self.f8 = _d_f8.make() if f8 is _d_f8 else f8
    self.f9 = f9


def _init11_00000000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any, f9: Any, f10: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = f5
    self.f6 = f6
    self.f7 = f7
    self.f8 = f8
    self.f9 = f9
    self.f10 = f10


def _init11_00000000001(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any, f9: Any, f10: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = f5
    self.f6 = f6
    self.f7 = f7
    self.f8 = f8
    self.f9 = f9
    self.f10 = _d_f10.make() if f10 is _d_f10 else f10


def _init13_0000000000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any, f9: Any, f10: Any, f11: Any, f12: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = f5
    self.f6 = f6
    self.f7 = f7
    self.f8 = f8
    self.f9 = f9
    self.f10 = f10
    self.f11 = f11
    self.f12 = f12


def _frozen13_0000000000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any, f9: Any, f10: Any, f11: Any, f12: Any,
) -> None:
    _set(self, 'f0', f0)
    _set(self, 'f1', f1)
    _set(self, 'f2', f2)
    _set(self, 'f3', f3)
    _set(self, 'f4', f4)
    _set(self, 'f5', f5)
    _set(self, 'f6', f6)
    _set(self, 'f7', f7)
    _set(self, 'f8', f8)
    _set(self, 'f9', f9)
    _set(self, 'f10', f10)
    _set(self, 'f11', f11)
    _set(self, 'f12', f12)


def _init13_0001001000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any, f9: Any, f10: Any, f11: Any, f12: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = _d_f3.make() if f3 is _d_f3 else f3
    self.f4 = f4
    self.f5 = f5
    self.f6 = _d_f6.make() if f6 is _d_f6 else f6
    self.f7 = f7
    self.f8 = f8
    self.f9 = f9
    self.f10 = f10
    self.f11 = f11
    self.f12 = f12


def _init16_0001110001000100(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any, f9: Any, f10: Any, f11: Any, f12: Any, f13: Any, f14: Any,
    f15: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = _d_f3.make() if f3 is _d_f3 else f3
    self.f4 = _d_f4.make() if f4 is _d_f4 else f4
    self.f5 = _d_f5.make() if f5 is _d_f5 else f5
    self.f6 = f6
    self.f7 = f7
    self.f8 = f8
    self.f9 = _d_f9.make() if f9 is _d_f9 else f9
    self.f10 = f10
    self.f11 = f11
    self.f12 = f12
    self.f13 = _d_f13.make() if f13 is _d_f13 else f13
    self.f14 = f14
    self.f15 = f15


def _init21_000000000000000000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any, f9: Any, f10: Any, f11: Any, f12: Any, f13: Any, f14: Any,
    f15: Any, f16: Any, f17: Any, f18: Any, f19: Any, f20: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = f5
    self.f6 = f6
    self.f7 = f7
    self.f8 = f8
    self.f9 = f9
    self.f10 = f10
    self.f11 = f11
    self.f12 = f12
    self.f13 = f13
    self.f14 = f14
    self.f15 = f15
    self.f16 = f16
    self.f17 = f17
    self.f18 = f18
    self.f19 = f19
    self.f20 = f20


def _init22_0000000000000000000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any, f9: Any, f10: Any, f11: Any, f12: Any, f13: Any, f14: Any,
    f15: Any, f16: Any, f17: Any, f18: Any, f19: Any, f20: Any, f21: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = f5
    self.f6 = f6
    self.f7 = f7
    self.f8 = f8
    self.f9 = f9
    self.f10 = f10
    self.f11 = f11
    self.f12 = f12
    self.f13 = f13
    self.f14 = f14
    self.f15 = f15
    self.f16 = f16
    self.f17 = f17
    self.f18 = f18
    self.f19 = f19
    self.f20 = f20
    self.f21 = f21


def _init25_0000000000001100000000000(
    self: Any, f0: Any, f1: Any, f2: Any, f3: Any, f4: Any, f5: Any, f6: Any,
    f7: Any, f8: Any, f9: Any, f10: Any, f11: Any, f12: Any, f13: Any, f14: Any,
    f15: Any, f16: Any, f17: Any, f18: Any, f19: Any, f20: Any, f21: Any, f22: Any,
    f23: Any, f24: Any,
) -> None:
    self.f0 = f0
    self.f1 = f1
    self.f2 = f2
    self.f3 = f3
    self.f4 = f4
    self.f5 = f5
    self.f6 = f6
    self.f7 = f7
    self.f8 = f8
    self.f9 = f9
    self.f10 = f10
    self.f11 = f11
    self.f12 = _d_f12.make() if f12 is _d_f12 else f12
    self.f13 = _d_f13.make() if f13 is _d_f13 else f13
    self.f14 = f14
    self.f15 = f15
    self.f16 = f16
    self.f17 = f17
    self.f18 = f18
    self.f19 = f19
    self.f20 = f20
    self.f21 = f21
    self.f22 = f22
    self.f23 = f23
    self.f24 = f24


#: the shapes written out above, by name (:func:`shape_name`)
_GENERATED: dict[str, Callable[..., None]] = {
    "_init0_": _init0_,
    "_init1_0": _init1_0,
    "_frozen1_0": _frozen1_0,
    "_init2_00": _init2_00,
    "_frozen2_00": _frozen2_00,
    "_init3_000": _init3_000,
    "_frozen3_000": _frozen3_000,
    "_init3_001": _init3_001,
    "_init3_111": _init3_111,
    "_init4_0000": _init4_0000,
    "_frozen4_0000": _frozen4_0000,
    "_init5_00000": _init5_00000,
    "_frozen5_00000": _frozen5_00000,
    "_init5_00001": _init5_00001,
    "_init5_00010": _init5_00010,
    "_init5_01111": _init5_01111,
    "_init6_000000": _init6_000000,
    "_frozen6_000000": _frozen6_000000,
    "_init6_000001": _init6_000001,
    "_init6_001111": _init6_001111,
    "_init7_0000000": _init7_0000000,
    "_frozen7_0000000": _frozen7_0000000,
    "_init8_00000000": _init8_00000000,
    "_init8_00001111": _init8_00001111,
    "_init9_000000000": _init9_000000000,
    "_frozen9_000000000": _frozen9_000000000,
    "_init10_0000000000": _init10_0000000000,
    "_init10_0011110110": _init10_0011110110,
    "_init11_00000000000": _init11_00000000000,
    "_init11_00000000001": _init11_00000000001,
    "_init13_0000000000000": _init13_0000000000000,
    "_frozen13_0000000000000": _frozen13_0000000000000,
    "_init13_0001001000000": _init13_0001001000000,
    "_init16_0001110001000100": _init16_0001110001000100,
    "_init21_000000000000000000000": _init21_000000000000000000000,
    "_init22_0000000000000000000000": _init22_0000000000000000000000,
    "_init25_0000000000001100000000000": _init25_0000000000001100000000000,
}
# --- end of generated code ---------------------------------------------------------------
