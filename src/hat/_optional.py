"""Optional dependencies: the libraries of an extra (``pip install 'hat-retrieval[EXTRA]'``).

Every import of an optional library sits in a :func:`needs_extra` block, at first use::

    with needs_extra("index"):
        import faiss

so that the core package imports without it, and a missing one is reported as one line
that names the extra to install.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DISTRIBUTION", "MissingExtraError", "needs_extra"]

# The name this package is installed under (pyproject.toml's project.name).
DISTRIBUTION = "hat-retrieval"


class MissingExtraError(ImportError):
    """A library of an optional extra is not installed; the message says what to install."""


@contextmanager
def needs_extra(extra: str) -> Iterator[None]:
    """Turn a module that cannot be found, imported in this block, into a
    :class:`MissingExtraError`: ``hat EXTRA needs PACKAGE: pip install 'hat-retrieval[EXTRA]'``
    (``PACKAGE``: the top-level name of the missing module)."""
    try:
        yield
    except ModuleNotFoundError as err:
        missing = str(err.name).partition(".")[0]  # the package to install, not its submodule
        raise MissingExtraError(
            f"hat {extra} needs {missing}: pip install '{DISTRIBUTION}[{extra}]'", name=missing
        ) from err
