"""Symlink resolution inside a snapshot (snapfs.links): escapes are found through chains."""

from __future__ import annotations

import pytest

from snapfs.format import dir_entry, symlink_entry
from snapfs.links import LinkResolution

D = "0" * 64


def structure(**links: str) -> dict[bytes, object]:
    """Directories a, a/b, c; symlinks from keyword args (path with '__' for '/')."""
    out: dict[bytes, object] = {p: dir_entry(p.rsplit(b"/", 1)[-1], D, 0, 0) for p in (b"a", b"a/b", b"c")}
    for path, target in links.items():
        raw = path.replace("__", "/").encode()
        out[raw] = symlink_entry(raw.rsplit(b"/", 1)[-1], target.encode())
    return out


def escapes(link: str, target: str, tree: dict) -> bool:
    resolution = LinkResolution(link.encode(), target.encode())
    while (path := resolution.needs()) is not None:
        resolution.feed(tree.get(path))
    return bool(resolution.escapes)


@pytest.mark.parametrize(
    ("link", "target", "expected"),
    [
        ("x", "a/b", False),
        ("a/x", "../c", False),
        ("a/b/x", "../../c/file", False),
        ("x", "..", True),
        ("a/x", "../..", True),
        ("x", "/etc/passwd", True),
        ("x", "a/../../etc", True),
        ("x", "missing/../..", True),  # the kernel would stop at 'missing'; DEST may differ
        ("x", "a/b/../../c", False),
    ],
)
def test_lexical_cases(link: str, target: str, expected: bool) -> None:
    assert escapes(link, target, structure()) is expected


def test_escape_through_a_chain_of_harmless_looking_links() -> None:
    tree = structure(a__up="..")  # a/up -> .. : the root, harmless
    assert escapes("a/up", "..", tree) is False
    assert escapes("x", "a/up/..", tree) is True  # lexically inside, really the parent
    assert escapes("x", "a/up/c", tree) is False


def test_link_loops_end_without_escaping() -> None:
    tree = structure(p="q", q="p")
    assert escapes("x", "p/anything", tree) is False


def test_unknown_components_are_treated_lexically() -> None:
    tree = structure()  # 'f' is not in the structure: a file or nothing
    assert escapes("x", "f/../../..", tree) is True
    assert escapes("x", "f/..", tree) is False
