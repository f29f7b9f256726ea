"""MkDocs hook: replaces ``<!-- peft-lorsu-help -->`` in a page with the ``--help`` text of every command.

The text comes from ``peft_lorsu.app.cli.build_parser()`` at build time, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- peft-lorsu-help -->"


def _help_text(parser: argparse.ArgumentParser) -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it so every build is the same
    try:
        return parser.format_help().rstrip()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _reference() -> str:
    from peft_lorsu.app.cli import build_parser

    parser = build_parser()
    parts = ["### `peft-lorsu`", "", "```text", _help_text(parser), "```"]
    for action in parser._actions:  # argparse exposes sub-commands only through its actions
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parts += ["", f"### `peft-lorsu {name}`", "", "```text", _help_text(sub), "```"]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _reference())
    return markdown
