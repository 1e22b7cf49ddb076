"""Where does a symlink inside a snapshot really lead? (pure, no I/O)

A lexical check of one target is not enough: with ``sub/up -> ..`` and
``x -> sub/up/..``, each target looks harmless, yet ``x`` resolves to the
parent of the snapshot. ``LinkResolution`` follows symlinks inside the snapshot
the way the kernel would, one path component at a time, asking its driver for
the entries it needs, and decides whether the link escapes the snapshot root.

It is a step machine so that a synchronous caller (pull) and an async one (the
mount) drive the same logic:

    resolution = LinkResolution(link_path, target)
    while (path := resolution.needs()) is not None:
        resolution.feed(lookup(path))      # the Entry at that path, or None
    resolution.escapes                      # True or False
"""

from __future__ import annotations

from .format import Entry

# The kernel gives up after 40 links (ELOOP); so do we, and a loop that never
# leaves the snapshot is harmless.
MAX_LINKS = 40


class LinkResolution:
    def __init__(self, link_path: bytes, target: bytes) -> None:
        self.parts: list[bytes] = [p for p in link_path.split(b"/") if p][:-1]
        self.queue: list[bytes] = []
        self.links = 0
        self.escapes: bool | None = None
        self._pending: bytes | None = None
        self._follow(target)
        self._advance()

    def _follow(self, target: bytes) -> None:
        if target.startswith(b"/"):
            self.escapes = True
            return
        self.queue[:0] = [p for p in target.split(b"/") if p and p != b"."]

    def _advance(self) -> None:
        """Consume components until one needs a lookup, or the answer is known."""
        while self.escapes is None:
            if not self.queue:
                self.escapes = False
                return
            component = self.queue[0]
            if component == b"..":
                self.queue.pop(0)
                if not self.parts:
                    self.escapes = True
                    return
                self.parts.pop()
                continue
            self._pending = b"/".join([*self.parts, component])
            return

    def needs(self) -> bytes | None:
        """The snapshot path whose entry is needed next, or None when decided."""
        return None if self.escapes is not None else self._pending

    def feed(self, entry: Entry | None) -> None:
        component = self.queue.pop(0)
        if entry is not None and entry.is_symlink:
            self.links += 1
            if self.links > MAX_LINKS:
                self.escapes = False  # ELOOP: resolution fails, nothing is reached
                return
            self._follow(entry.target or b"")
        else:
            # A directory, a file or nothing. The kernel would stop at a file or a
            # missing name, but a pull with --force may meet a directory of that
            # name already in DEST, so resolution goes on lexically: strict, safe.
            self.parts.append(component)
        self._advance()
