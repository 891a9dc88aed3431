"""``btrdelta._value.value_class`` and ``btrdelta._value.Value`` behave like
``@dataclass(slots=True)`` (the oracle)."""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from btrdelta import _value
from btrdelta._value import Value, field, field_names, value_class

ROOT = Path(__file__).resolve().parents[1]


@value_class
class Ours:
    kind: ClassVar[str] = "k"
    path: bytes
    size: int
    extra: int | None = None


class OursV(Value):
    kind: ClassVar[str] = "k"
    path: bytes
    size: int
    extra: int | None = None


@dataclasses.dataclass(slots=True)
class Theirs:
    kind: ClassVar[str] = "k"
    path: bytes
    size: int
    extra: int | None = None


@value_class
class Empty:
    tag: ClassVar[int] = 3


@pytest.mark.parametrize(("args", "kwargs"), [((b"p", 1), {}), ((b"p",), {"size": 2, "extra": 5}),
                                         ((), {"path": b"x", "size": 0})])
@pytest.mark.parametrize("cls", [Ours, OursV])
def test_same_as_a_slotted_dataclass(args: tuple, kwargs: dict, cls: type[Ours]) -> None:
    ours, theirs = cls(*args, **kwargs), Theirs(*args, **kwargs)
    assert repr(ours).replace(cls.__name__, "Theirs") == repr(theirs)
    assert field_names(cls) == tuple(f.name for f in dataclasses.fields(Theirs))
    assert cls.__slots__ == Theirs.__slots__  # type: ignore[attr-defined]
    assert cls.kind == "k"
    assert ours.kind == "k"
    assert ours == cls(*args, **kwargs)
    assert ours != cls(b"other", 9)
    assert ours != theirs  # another class: NotImplemented on both sides
    assert ours != (OursV if cls is Ours else Ours)(*args, **kwargs)
    with pytest.raises(AttributeError):
        ours.not_a_field = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        hash(ours)


def test_init_errors_like_a_dataclass() -> None:
    with pytest.raises(TypeError):
        Ours(b"p")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Ours(b"p", 1, 2, 3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        @value_class
        class Bad:
            a: int = 0
            b: int
    with pytest.raises(TypeError):
        class BadV(Value):
            a: int = 0
            b: int
    with pytest.raises(TypeError):
        OursV(b"p")  # type: ignore[call-arg]


def test_no_fields() -> None:
    assert Empty() == Empty()
    assert repr(Empty()) == "Empty()"
    assert field_names(Empty) == ()
    assert Empty.tag == 3


@value_class
class OursMade:
    name: bytes
    links: list[int] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class TheirsMade:
    name: bytes
    links: list[int] = dataclasses.field(default_factory=list)
    seen: dict[int, int] = dataclasses.field(default_factory=dict)


def test_default_factory_makes_one_per_instance() -> None:
    a, b = OursMade(b"a"), OursMade(b"b")
    a.links.append(1)
    assert b.links == []
    assert b.seen == {}
    assert repr(a).replace("OursMade", "TheirsMade") == repr(TheirsMade(b"a", [1]))
    given = [7]
    assert OursMade(b"c", given).links is given
    assert OursMade(b"c", seen={1: 2}) == OursMade(b"c", [], {1: 2})


@value_class(frozen=True)
class OursFrozen:
    uuid: bytes | None = None
    stamp: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class TheirsFrozen:
    uuid: bytes | None = None
    stamp: int = 0


class OursFrozenV(Value, frozen=True):
    uuid: bytes | None = None
    stamp: int = 0


@pytest.mark.parametrize("cls", [OursFrozen, OursFrozenV])
def test_frozen_like_a_frozen_dataclass(cls: type[OursFrozen]) -> None:
    ours, theirs = cls(b"u", 3), TheirsFrozen(b"u", 3)
    assert repr(ours).replace(cls.__name__, "TheirsFrozen") == repr(theirs)
    assert hash(ours) == hash(cls(b"u", 3))
    assert {ours, cls(b"u", 3), cls()} == {cls(), ours}
    for obj in (ours, theirs):
        with pytest.raises(AttributeError):
            obj.stamp = 4  # type: ignore[misc]
        with pytest.raises(AttributeError):
            del obj.stamp
    assert ours.stamp == 3


class Checked(Value, frozen=True):
    low: int
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low above high")


@dataclasses.dataclass(frozen=True, slots=True)
class TheirsChecked:
    low: int
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low above high")


@pytest.mark.parametrize("cls", [Checked, TheirsChecked])
def test_post_init_and_replace_like_a_dataclass(cls: type[Checked]) -> None:
    """``__post_init__`` runs after the fields are set (its error propagates), and
    ``_value.replace`` is ``dataclasses.replace``: a new instance, checked again."""
    replace = _value.replace if cls is Checked else dataclasses.replace
    a = cls(3)
    assert (a.low, a.high) == (3, 10)
    with pytest.raises(ValueError, match="low above high"):
        cls(11)
    with pytest.raises(ValueError, match="low above high"):
        cls(high=2, low=5)
    b = replace(a, high=4)
    assert (b.low, b.high, a.high) == (3, 4, 10)
    assert replace(a) == a
    assert replace(a) is not a
    with pytest.raises(ValueError, match="low above high"):
        replace(a, low=99)
    with pytest.raises(TypeError):
        replace(a, nope=1)  # type: ignore[call-arg]


def test_a_value_class_is_made_once() -> None:
    """``class C(Value)`` makes one class (``@value_class``: the ``class`` statement's, then
    the slotted one); a subclass of a value class is made as written (its own slots)."""
    def made(name: str) -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, type) and o.__name__ == name)

    gc.disable()
    try:
        @value_class
        class Twice:
            a: int

        class Once(Value):
            a: int

        class SubOfOnce(Once):
            __slots__ = ("b",)

        assert (made("Twice"), made("Once"), made("SubOfOnce")) == (2, 1, 1)
    finally:
        gc.enable()
    s = SubOfOnce(1)
    s.b = 2
    assert (s.a, s.b, field_names(SubOfOnce), SubOfOnce.__slots__) == (1, 2, ("a",), ("b",))
    assert Once(1) == Once(1) != SubOfOnce(1)
    with pytest.raises(TypeError, match="direct subclass"):
        class SubFrozen(Once, frozen=True):
            pass


def test_one_compiled_init_per_shape_renamed_per_class() -> None:
    """Classes of one shape share the compiled ``__init__`` (renamed): names that are the
    placeholders' own, keywords, defaults and factories still land in the right fields."""
    @value_class
    class Swapped:
        f1: int
        f0: int = 5
        _set: list[int] = field(default_factory=list)

    @value_class
    class Other:
        a: int
        b: int = 6
        c: list[int] = field(default_factory=list)

    s = Swapped(1)
    assert (s.f1, s.f0, s._set) == (1, 5, [])
    assert Swapped(f0=2, f1=3) == Swapped(3, 2, [])
    assert Swapped(1)._set is not s._set
    assert (Other(1).a, Other(1).b, Other(a=2, c=[3]).c) == (1, 6, [3])
    assert Swapped.__init__.__code__.co_code == Other.__init__.__code__.co_code
    assert Swapped.__init__.__code__.co_varnames[:4] == ("self", "f1", "f0", "_set")
    assert Swapped.__init__.__qualname__.endswith("Swapped.__init__")
    with pytest.raises(TypeError, match="f1"):
        Swapped()  # type: ignore[call-arg]


def test_generated_shapes_are_current() -> None:
    """Every shape of btrdelta's own value classes is written out in ``_value.py``
    (``scripts/gen_value_shapes.py``), so none is compiled when a command starts."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gen_value_shapes.py"),
                           "--check"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("frozen", [False, True])
def test_generated_and_compiled_shapes_are_the_same_code(frozen: bool) -> None:
    """A shape written out ahead and one compiled when first used make the same
    ``__init__`` (the generated code is :func:`shape_source`'s text); a shape not written
    out (13 fields, a factory) is compiled and works."""
    for shape in [(6, (False, False, True, True, True, True), False), (4, (False,) * 4, True),
                  (0, (), False)]:
        made = _value._GENERATED[_value.shape_name(shape)].__code__
        scope: dict[str, object] = {}
        exec(compile(_value.shape_source(shape), "<test>", "exec"), scope)
        compiled = scope["__init__"].__code__  # type: ignore[attr-defined]
        assert (made.co_code, made.co_consts, made.co_names, made.co_varnames) == (
            compiled.co_code, compiled.co_consts, compiled.co_names, compiled.co_varnames)
    names = [f"x{i}" for i in range(12)]
    assert _value.shape_name((13, (False,) * 12 + (True,), frozen)) not in _value._GENERATED
    ns: dict[str, object] = {"__annotations__": dict.fromkeys([*names, "tags"], "int")}
    ns["tags"] = field(default_factory=list)
    cls = value_class(frozen=frozen)(type("Wide", (), ns))
    a, b = cls(*range(12)), cls(*range(12))
    assert field_names(cls) == (*names, "tags")
    assert (a.x11, a.tags, a == b, a.tags is not b.tags) == (11, [], True, True)
    assert cls.__init__.__code__.co_name == "__init__"


def test_named_tuple_is_a_namedtuple_without_its_compiled_new() -> None:
    """``_value.named_tuple`` against ``collections.namedtuple`` (the oracle), for the
    tables of the send's path (``stream.constants.Field``, ``fs.btrfs.FileattrFlag``)."""
    import collections
    import pickle

    from btrdelta.fs.btrfs import FILEATTR_FLAGS
    from btrdelta.stream.constants import COMMAND_SPECS, Field

    def new(_cls: Any, attr: int, name: str, optional: bool = False) -> tuple[Any, ...]:
        return tuple.__new__(_cls, (attr, name, optional))

    ours = _value.named_tuple("Pair", new, __name__)
    theirs = collections.namedtuple("Pair", ["attr", "name", "optional"], defaults=[False])
    for args, kwargs in (((1, "a"), {}), ((1, "a", True), {}), ((2,), {"name": "b"}),
                         ((), {"attr": 3, "name": "c", "optional": True})):
        a, b = ours(*args, **kwargs), theirs(*args, **kwargs)
        assert repr(a) == repr(b)
        assert a == b
        assert hash(a) == hash(b)
        assert tuple(a) == tuple(b)
        assert (a.attr, a.name, a.optional) == (b.attr, b.name, b.optional)
    assert ours._fields == theirs._fields == ours.__match_args__
    assert isinstance(ours(1, "a"), tuple)
    assert ours.__module__ == __name__
    for bad in ((), (1, 2, 3, 4)):
        with pytest.raises(TypeError):
            ours(*bad)
    with pytest.raises(AttributeError):
        ours(1, "a").attr = 2  # type: ignore[misc]
    # the module's own: the same tables as namedtuple made them
    made = collections.namedtuple("Field", ["attr", "name", "optional"], defaults=[False])
    for spec in COMMAND_SPECS.values():
        assert all(repr(f) == repr(made(*f)) for f in spec.fields)
    assert Field(1, "x") == made(1, "x")
    flag = collections.namedtuple("FileattrFlag", ["name", "bit", "fs_name", "fs_bit"])
    assert [repr(f) for f in FILEATTR_FLAGS] == [repr(flag(*f)) for f in FILEATTR_FLAGS]
    copy = pickle.loads(pickle.dumps(FILEATTR_FLAGS[0]))
    assert copy == FILEATTR_FLAGS[0]
    assert type(copy) is type(FILEATTR_FLAGS[0])
