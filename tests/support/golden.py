"""Golden files: compared by default, rewritten only when ``PHYLLOME_REGENERATE=1``.

    if regenerating():
        path.write_text(got)
    assert got == path.read_text()

Only the value ``1`` rewrites: ``PHYLLOME_REGENERATE=0`` (or ``false``) left in a shell must
not silently turn every golden test into one that passes.
"""

from __future__ import annotations

import os


def regenerating() -> bool:
    return os.environ.get("PHYLLOME_REGENERATE") == "1"
