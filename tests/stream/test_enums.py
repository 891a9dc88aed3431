"""The stream package's enums are made by ``constants.simple_enum`` (``enum._simple_enum``,
without ``EnumType``'s per-member work): each is the enum its class statement makes as a
plain ``class X(enum.IntEnum)`` (checked by ``enum._test_simple_enum``: members, values,
names, docs, module, methods), and behaves as one."""

from __future__ import annotations

import enum
import inspect
import pickle
import re
from typing import Any

import pytest

from btrdelta.stream import constants, framing
from btrdelta.stream.constants import Attr, Cmd, Kind, simple_enum

MADE = [constants.Cmd, constants.Attr, constants.Compression, constants.Kind,
        framing.Sentinel, framing.DCmd, framing.Place]


def _classic(cls: Any) -> Any:
    """The enum made from ``cls``'s own source as a plain enum class statement."""
    source = inspect.getsource(cls)
    body = re.sub(r"^@simple_enum\((enum\.\w+)\)\nclass (\w+)\(_\w+\):",
                  r"class \2(\1):", source, flags=re.M)
    assert body != source
    namespace: dict[str, Any] = {"enum": enum, "__name__": cls.__module__}
    exec(compile(body, inspect.getsourcefile(cls) or "?", "exec"), namespace)
    return namespace[cls.__name__]


@pytest.mark.parametrize("cls", MADE, ids=lambda c: c.__name__)
def test_each_is_the_enum_its_class_statement_makes(cls: Any) -> None:
    classic = _classic(cls)
    assert type(classic) is enum.EnumType
    enum._test_simple_enum(classic, cls)  # type: ignore[attr-defined]
    assert [(m.name, m.value) for m in cls] == [(m.name, m.value) for m in classic]


def test_a_difference_is_seen() -> None:
    classic = _classic(Cmd)
    with pytest.raises(TypeError, match="enum mismatch"):
        enum._test_simple_enum(classic, Attr)  # type: ignore[attr-defined]


def test_they_behave_as_enums() -> None:
    assert Cmd(15) is Cmd.WRITE is Cmd["WRITE"]
    assert Cmd.WRITE == 15
    assert isinstance(Cmd.WRITE, int)
    assert f"{Attr.PATH}" == "15"
    assert repr(Cmd.END) == "<Cmd.END: 21>"
    assert str(Cmd.END) == "21"
    assert {Attr.PATH: 1}[15] == 1  # hashes as its int
    assert Kind("u8") is Kind.U8
    assert repr(Kind.DATA) == "<Kind.DATA: 'data'>"
    assert pickle.loads(pickle.dumps(Cmd.END)) is Cmd.END
    assert framing.NEED_DATA is framing.Sentinel.NEED_DATA
    assert len(Cmd) == 27
    assert len(Attr) == 36
    with pytest.raises(ValueError, match="99 is not a valid Cmd"):
        Cmd(99)
    place = framing.Place  # a Flag: its composite and its combinations as a Flag's
    assert [p.name for p in place] == ["SEND_V1", "SEND_V2", "SEND_V3", "DELTA", "CARRIER"]
    assert repr(place.SEND) == "<Place.SEND: 7>"
    assert place.SEND_V2 in place.SEND
    assert place.DELTA not in place.SEND
    assert place(3) is place.SEND_V1 | place.SEND_V2
    assert repr(place(3)) == "<Place.SEND_V1|SEND_V2: 3>"
    assert ~place.DELTA == place.SEND | place.CARRIER
    assert not place(0)


def test_the_functional_fallback_makes_the_same_enum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``enum`` has no ``_simple_enum`` (a future Python), the same enum is made."""
    monkeypatch.delattr(enum, "_simple_enum")

    class Colour:
        """Two colours."""

        RED = 1
        BLUE = 2

    made = simple_enum(enum.IntEnum)(Colour)
    assert isinstance(made, enum.EnumType)
    assert issubclass(made, enum.IntEnum)
    assert [(m.name, m.value) for m in made] == [("RED", 1), ("BLUE", 2)]
    assert made.__doc__ == "Two colours."
    assert made.__qualname__ == Colour.__qualname__


def test_made_as_the_standard_library_makes_it() -> None:
    """``simple_enum``'s own conversion (Python 3.11) against ``enum._simple_enum``'s, on
    the same plain classes: the class's namespace and each member's attributes."""

    def plain(doc: str | None) -> Any:
        return type("Colour", (), {"__module__": __name__, "__qualname__": "Colour",
                                   "__doc__": doc, "RED": 1, "BLUE": 2, "AZURE": 2,
                                   "label": lambda self: self.name.lower()})

    for etype in (enum.IntEnum, enum.Enum):
        for doc in ("Colours.", None):
            ours = simple_enum(etype)(plain(doc))
            theirs = enum._simple_enum(etype)(plain(doc))  # type: ignore[attr-defined]
            enum._test_simple_enum(theirs, ours)  # type: ignore[attr-defined]
            assert sorted(vars(ours)) == sorted(vars(theirs))
            assert ours.__doc__ == theirs.__doc__
            assert ours.AZURE is ours.BLUE
            assert list(ours.__members__) == ["RED", "BLUE", "AZURE"]
            assert ours.RED.label() == "red"
            for name, member in ours.__members__.items():
                mine = {k: (v if k != "__objclass__" else "cls") for k, v in vars(member).items()}
                other = vars(theirs[name])
                assert mine == {k: (v if k != "__objclass__" else "cls") for k, v in other.items()}
                assert member.__objclass__ is ours
