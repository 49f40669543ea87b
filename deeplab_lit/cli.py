"""What every command line shares: `--key=value` overrides and one-line errors with exit code 2."""
from __future__ import annotations

import os
import sys
from typing import Callable

from deeplab_lit.errors import UserError


def split_overrides(args: list[str]) -> list[str]:
    """`--model.output_stride=8` or `--model.output_stride 8` -> ["model.output_stride=8"]."""
    overrides, index = [], 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument '{arg}'; overrides look like --section.key=value")
        if "=" in arg:
            overrides.append(arg[2:])
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            overrides.append(f"{arg[2:]}={args[index + 1]}")
            index += 1
        else:
            raise UserError(f"override '{arg}' has no value; write {arg}=VALUE")
        index += 1
    return overrides


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run `main`, turning a UserError into one line on stderr and exit code 2."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
