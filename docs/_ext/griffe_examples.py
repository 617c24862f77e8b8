"""A griffe extension for the API reference: docstrings written for the REPL, read as Markdown.

loraplug's docstrings title their doctests ``Example:`` and name other objects with
Sphinx roles (:func:`merge`). Griffe's Google-style parser treats only ``Examples:`` as
code, and Markdown has no roles. Before a docstring is parsed, this renames the title
(so doctests render as code blocks) and turns each role into inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_TITLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|attr|data|exc|mod|obj):`~?([^`]+)`")


class ExampleSections(griffe.Extension):
    """Rewrite ``Example:`` titles to ``Examples:`` and Sphinx roles to inline code."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _TITLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(r"`\1`", text)
