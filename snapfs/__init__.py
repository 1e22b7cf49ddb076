"""snapfs: immutable, content-addressed, lazily mounted dataset snapshots.

The Python API mirrors the CLI::

    import snapfs
    snapshot_id = snapfs.id("./data")
    snapshot_id = snapfs.push("./data", store="s3://bucket/snaps")
    snapfs.pull(snapshot_id, "./copy", store="s3://bucket/snaps")
    repo = snapfs.open_store("s3://bucket/snaps")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import id, open_store, pull, push  # noqa: E402,F401,A004

__all__ = ["id", "push", "pull", "open_store", "__version__"]
