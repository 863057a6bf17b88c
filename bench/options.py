"""Command-line conventions shared by the bench scripts: where results go, and a --help that
states every option's default."""
from __future__ import annotations

import argparse
import os

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
# Committed results; a script writes here only when told to (--out bench/results).
COMMITTED_RESULTS = os.path.join(BENCH_DIR, "results")
# Default for every script's --out: git-ignored, so a casual run never touches committed results.
LOCAL_RESULTS = os.path.join(COMMITTED_RESULTS, "local")


def shown_default(default) -> str:
    """A default as one would type it: paths inside the repository relative to its root, lists
    space-separated, flags off, nothing as "none"."""
    if default is None or default == "":
        return "none"
    if default is False:
        return "off"
    if isinstance(default, (list, tuple)):
        return " ".join(shown_default(d) for d in default)
    if isinstance(default, str) and os.path.isabs(default) and default.startswith(REPO_ROOT + os.sep):
        return os.path.relpath(default, REPO_ROOT)
    return str(default)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; each option's help ends with its default, unless the help
    already says what the default is (defaults that depend on the device, say)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return text + " (default: " + shown_default(action.default).replace("%", "%%") + ")"


def parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_out(ap: argparse.ArgumentParser, what: str, default: str = LOCAL_RESULTS,
            committed: str = "bench/results") -> None:
    ap.add_argument("--out", default=default,
                    help=f"folder for {what} (committed ones: --out {committed})")
