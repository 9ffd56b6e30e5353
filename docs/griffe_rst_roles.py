"""A Griffe extension for `make docs`: medadv's docstrings use reST roles (:class:`~medadv.x.Y`), which
Markdown would print verbatim; each becomes a code span of the name as Sphinx would show it (``Y`` for a
``~``-shortened target). Cross-links are not attempted: an unresolved one would fail the strict build."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|obj|data|exc|const|ref|doc):`(~?)([^`<]*?)(?:\s*<[^>]*>)?`")


def _shown(match: re.Match[str]) -> str:
    target = match.group(2).strip()
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(_shown, obj.docstring.value)
