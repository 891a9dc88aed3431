"""btrdelta: small, fast and safe OS and application updates around btrfs send streams."""

from .errors import BtrdeltaError

__version__ = "0.1.0"
__all__ = ["BtrdeltaError", "__version__"]
