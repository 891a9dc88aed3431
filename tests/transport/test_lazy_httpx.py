"""httpx (40-60 ms to import) is imported only when HTTP is used: a command reading a
local repository, stream or archive never pays it; the first HTTP use gets the real client,
its connections paced (transport/pacing.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_CODE = """
import sys
from btrdelta.chunk import castr
from btrdelta.repo.mirror import Mirrors
from btrdelta.transport import config, http, pacing
from btrdelta.update import versions
m = Mirrors([sys.argv[1]])
m.close()
print("httpx._client" in sys.modules, "httpcore" in sys.modules)
m = Mirrors(["http://127.0.0.1:9/"])
client = m.client
import httpx
print(isinstance(client, httpx.Client), type(client._transport).__name__)
m.close()
"""


def test_httpx_is_imported_at_the_first_http_use(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _CODE, str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "False", "True", "PacedTransport"]
