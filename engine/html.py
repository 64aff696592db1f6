"""User and model text inside HTML and Markdown, made inert.

Two jobs, one helper each:

- ``script_json(value)``: JSON for a ``<script>`` block. ``json.dumps`` leaves ``<``, ``>``
  and ``&`` as they are, so a token ``</script><script>alert(1)</script>`` would close the
  block and run. Here they become ``\\u003c``, ``\\u003e``, ``\\u0026`` (the same string once
  parsed by JavaScript). U+2028/U+2029 are escaped too (line terminators in old JS engines).
- ``markdown_literal(text)``: text shown literally inside Streamlit Markdown (a message or a
  caption that names user text): every Markdown and HTML character is backslash-escaped, so
  ``![p](http://host/x.png)`` shows as typed and fetches nothing.

- ``text_html(text)``: text as HTML that stays text even where Streamlit also parses the HTML
  as Markdown (``st.markdown(..., unsafe_allow_html=True)``): ``html.escape`` plus every
  Markdown character as a numeric character reference (CommonMark treats those as literal
  text), newlines as ``<br>``.
"""

from __future__ import annotations

import html
import json
from typing import Any

_SCRIPT_UNSAFE = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
# What can make Markdown fetch, link, emphasise, format or run anything (links and images need
# "[" and "!", HTML needs "<", directives such as :red[...] need "["); punctuation that only
# matters at the start of a line (#, -, +, 1.) is left as it is, so messages read normally.
_MARKDOWN_SPECIAL = set("\\`*_{}[]!|<>~$&")


def script_json(value: Any, **dumps_kwargs: Any) -> str:
    """``json.dumps(value)`` safe to embed in an HTML ``<script>`` (no ``<``, ``>`` or ``&``).

    ``json.loads`` (or JavaScript) reads it back to the same value.
    """
    text = json.dumps(value, **dumps_kwargs)
    for char, escaped in _SCRIPT_UNSAFE.items():
        text = text.replace(char, escaped)
    return text


def markdown_literal(text: str) -> str:
    """``text`` shown as typed inside Markdown: no links, images, emphasis or HTML.

    Newlines are kept as Markdown line breaks.
    """
    escaped = "".join("\\" + c if c in _MARKDOWN_SPECIAL else c for c in str(text))
    return escaped.replace("\n", "  \n")


_MARKDOWN_ENTITIES = str.maketrans({c: f"&#{ord(c)};" for c in "\\`*_{}[]()#+-.!|~$:=\"'"})


def text_html(text: str, newline: str = "<br>") -> str:
    """``text`` as inert HTML text: escaped, Markdown characters as character references
    (so Markdown parsing around it finds no link, image or emphasis), each newline replaced
    by ``newline``."""
    # &, < and > first (their references hold no Markdown character), then the rest
    escaped = html.escape(str(text), quote=False).translate(_MARKDOWN_ENTITIES)
    return escaped.replace("\n", newline)
