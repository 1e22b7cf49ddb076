"""Helpers shared by the tests and by ``scripts/bench`` (which adds ``tests/`` to ``sys.path``)."""
