"""snapfs: immutable, content-addressed, lazily mounted dataset snapshots.

The Python API mirrors the CLI::

    import snapfs
    snapshot_id = snapfs.id("./data")
    snapshot_id = snapfs.push("./data", store="s3://bucket/snaps")
    snapfs.pull(snapshot_id, "./copy", store="s3://bucket/snaps")
    repo = snapfs.open_store("s3://bucket/snaps")
    snapfs.push("./data", store=repo, name="imagenet@1.2.0", tags=["release"])
    snapfs.record_run(inputs=["imagenet@1.2.0"], outputs="./ckpt", meta={"accuracy": 0.89}, store=repo)
    snapfs.ancestors("resnet@1", store=repo)
"""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # The API is imported on first use, so `snapfs --help` and other CLI calls
    # do not pay for records, boto3 and friends.
    if name in __all__ and name != "__version__":
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'snapfs' has no attribute {name!r}")


__all__ = [
    "id",
    "push",
    "pull",
    "open_store",
    "resolve",
    "log",
    "show",
    "ancestors",
    "tag",
    "record_run",
    "__version__",
]
