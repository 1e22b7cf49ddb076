"""Helpers for ``scripts/bench``, the project's one benchmark entry point.

Nothing here is part of the snapfs package: these modules drive snapfs only
through its CLI, and drive each peer (s3fs, rclone, JuiceFS, restic, snapdir,
DVC, b3sum) the way its own documentation says to.
"""
