"""What differs between the Python versions mauctl runs on (3.10 and newer), imported from one place.

``tomllib`` joined the standard library in 3.11; on 3.10 the same parser is the ``tomli`` package
(a dependency there, see pyproject.toml). Read TOML with ``from mauctl.compat import tomllib``.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

__all__ = ["tomllib"]
