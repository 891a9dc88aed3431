"""The C accelerators' shared header is generated from the Python tables and must not drift;
the C files take their numbers from it instead of re-declaring them."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src/btrdelta"


def test_constants_header_is_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gen_constants.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_c_files_include_the_header_and_redeclare_nothing_of_it() -> None:
    header = (SRC / "_constants.h").read_text()
    names = set(re.findall(r"^#define (\w+)", header, re.M))
    names |= set(re.findall(r"^\s+(\w+) = ", header, re.M))
    names |= set(re.findall(r"(\w+) = 0x", header))
    c_files = sorted(SRC.glob("*/*.c"))
    # every accelerator of a subpackage that setup.py builds (a new one is checked too)
    built = set(re.findall(r'"src/btrdelta/(\w+/\w+\.c)"', (ROOT / "setup.py").read_text()))
    assert built
    assert {str(c.relative_to(SRC)) for c in c_files} == built
    for c in c_files:
        text = c.read_text()
        assert '#include "_constants.h"' in text, c
        redeclared = {n for n in names if re.search(rf"(#define\s+{n}\b|\b{n}\s*=)", text)}
        assert not redeclared, (c.name, redeclared)
