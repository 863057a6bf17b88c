"""Command-line conventions shared by the bench scripts (helper module, not a script): where
results go, a --help that states every option's default and answers before torch loads, and the
known harmless library warnings kept off the output. Standard library only."""
from __future__ import annotations

import argparse
import logging
import os
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
# Committed results; a script writes here only when told to (--out bench/results).
COMMITTED_RESULTS = os.path.join(BENCH_DIR, "results")
# Default for every script's --out: git-ignored, so a casual run never touches committed results.
LOCAL_RESULTS = os.path.join(COMMITTED_RESULTS, "local")
# The trained tiny model frkern ships (tiny_model.ASSET_DIR, named here so that parsers need no torch).
TINY_MODEL_DIR = os.path.join(BENCH_DIR, "assets", "tiny_model")
DEVICE_HELP = "torch device (default: cuda if available, else cpu)"


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


def parser(doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, epilog=epilog, formatter_class=HelpFormatter)


def help_before_imports(make_parser) -> None:
    """Called by a script run as __main__ before its heavy imports (torch, diffusers, frkern): with
    -h/--help, print the help and exit, so that it answers in well under a second."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        make_parser().parse_args()


def default_device(device: str | None) -> str:
    """--device as given, else cuda if available, else cpu (imports torch)."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Known harmless warnings of the libraries, dropped from the output; (logger, start of the message).
# diffusers' ModelMixin.to() warns on any cast with a dtype, even with no module to keep in float32
# (the list is empty for every UNet here; a non-empty one is a real warning and is kept), and
# from_pretrained warns when accelerate (an optional speed-up for loading) is not installed.
KNOWN_HARMLESS = (
    ("diffusers.models.modeling_utils", "There are modules in UNet2DConditionModel that should be kept in float32: []."),
    ("diffusers.models.modeling_utils", "Cannot initialize model with low cpu memory usage because `accelerate`"),
)


class _DropKnown(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_known_warnings() -> None:
    """Drop KNOWN_HARMLESS from their loggers (idempotent); every other warning and error stays."""
    by_logger: dict[str, list[str]] = {}
    for name, prefix in KNOWN_HARMLESS:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in log.filters):
            log.addFilter(_DropKnown(prefixes))


def add_out(ap: argparse.ArgumentParser, what: str, default: str = LOCAL_RESULTS,
            committed: str = "bench/results") -> None:
    ap.add_argument("--out", default=default,
                    help=f"folder for {what} (committed ones: --out {committed})")
