"""A side-effect sentinel: every file created, changed or removed under some roots while a
test ran, outside the directories the code under test may write.

    watch = Sentinel([tmp_path, Path("/etc/libvirt")], allowed=[tmp_path / "state" / "pools"])
    ...                                   # the test
    assert watch.changes() == []          # ["created /etc/libvirt/x", "changed ...", ...]

A file is its (size, mtime, mode); a directory counts only by being there (its mtime moves
whenever an allowed child changes). Symbolic links are recorded, never followed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

Stat = tuple[int, int, int]  # size, mtime_ns, mode; (-1, -1, mode) for a directory


def snapshot(roots: Iterable[Path], allowed: Iterable[Path] = ()) -> dict[str, Stat]:
    skip = {str(p) for p in allowed}
    out: dict[str, Stat] = {}
    for root in roots:
        if not os.path.lexists(root):
            continue
        for top, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
            for name in dirs:
                path = os.path.join(top, name)
                out[path] = (-1, -1, os.lstat(path).st_mode)
            for name in files:
                path = os.path.join(top, name)
                if path in skip:
                    continue
                try:
                    st = os.lstat(path)
                except FileNotFoundError:  # removed while we walked
                    continue
                out[path] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


class Sentinel:
    def __init__(self, roots: Iterable[Path], allowed: Iterable[Path] = ()) -> None:
        self.roots, self.allowed = [Path(r) for r in roots], [Path(a) for a in allowed]
        self.before = snapshot(self.roots, self.allowed)

    def changes(self) -> list[str]:
        after = snapshot(self.roots, self.allowed)
        out = [f"created {p}" for p in sorted(after.keys() - self.before.keys())]
        out += [f"removed {p}" for p in sorted(self.before.keys() - after.keys())]
        out += [f"changed {p}" for p in sorted(after.keys() & self.before.keys())
                if after[p] != self.before[p]]
        return out
