"""A griffe extension for the API reference: doctest blocks written at the left margin of a docstring (``>>>`` lines
and their output, up to a blank line) become ```pycon code blocks, instead of Markdown quotes (``>`` starts a quote).

Loaded by mkdocstrings (mkdocs.yml: plugins → mkdocstrings → handlers → python → options → extensions).
"""

from __future__ import annotations

import griffe


def fence_doctests(text: str) -> str:
    out: list[str] = []
    in_block = in_fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if not in_fence and not in_block and line.startswith(">>>"):
            out.append("```pycon")
            in_block = True
        elif in_block and not line.strip():
            out.append("```")
            in_block = False
        out.append(line)
    if in_block:
        out.append("```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
