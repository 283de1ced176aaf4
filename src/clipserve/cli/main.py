"""The `clipserve` command line.

Each command group lives in its own module under `clipserve.cli` and exposes `register(subparsers)`, which adds
its parser and sets `func` (taking the parsed args, returning an exit code). Errors that users can cause are
reported as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from clipserve import __version__

# Modules under clipserve.cli that register subcommands, in the order --help lists them.
COMMAND_MODULES = ("runtime", "serve", "demo", "collection", "evaluate", "train", "export")


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 2 (or `code`)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user as it is."""
    from clipserve.config import ConfigError
    from clipserve.io.checkpoints import CheckpointError
    from clipserve.io.hub import HubError
    from clipserve.io.images import ImageError
    from clipserve.registry import UnknownModelError

    errors: list[type[BaseException]] = [
        CLIError, ConfigError, CheckpointError, HubError, ImageError, UnknownModelError, FileNotFoundError,
        PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
    ]
    try:
        from clipserve.io.tokenizers import TokenizerError

        errors.append(TokenizerError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipserve",
        description="OpenCLIP models as a library, a command line and an OpenAI-compatible HTTP API.",
    )
    parser.add_argument("--version", action="version", version=f"clipserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"clipserve.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"clipserve.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # huggingface_hub logs every retry; our own errors already say what failed and why.
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("clipserve: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose or os.environ.get("CLIPSERVE_DEBUG"):
            raise
        if isinstance(exc, user_errors()):
            message = str(exc).strip() or type(exc).__name__
            print(f"clipserve {args.command}: error: {message}", file=sys.stderr)
            return getattr(exc, "code", 2)
        print(
            f"clipserve {args.command}: internal error: {type(exc).__name__}: {exc} (rerun with -v for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
