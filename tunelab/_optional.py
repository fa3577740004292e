"""The one guard for optional dependencies (DESIGN principle 9)."""

from __future__ import annotations

import importlib
from types import ModuleType

from tunelab.errors import MissingExtra


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise MissingExtra(
            f"'{module}' is not installed ({e}); install it with: pip install 'tunelab[{extra}]'"
        ) from None
