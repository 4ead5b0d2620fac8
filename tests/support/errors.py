"""The error tree as tests see it, walked independently of the registry in shared/errors.py.

    for cls in error_classes(): ...     # NotFound, Conflict, Timeout, Internal, ...
"""

from __future__ import annotations

from shared.errors import PhyError


def error_classes() -> list[type[PhyError]]:
    """Every class of the error tree below the root (each one may be raised and sent)."""
    out: list[type[PhyError]] = []
    todo = list(PhyError.__subclasses__())
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo += cls.__subclasses__()
    return out
