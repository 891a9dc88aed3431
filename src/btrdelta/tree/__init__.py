"""Trees: the tree checksum (and, for receive/delta, path models while a stream flows)."""

from .treesum import Entry, diff_manifests, tree_manifest, tree_sum

__all__ = ["Entry", "diff_manifests", "tree_manifest", "tree_sum"]
