"""The project's user-facing errors: a bad config field, flag or file, with a message that names
it and says what to do. The command-line entry points print these without a traceback; any other
exception (a bug here, or in torch, NumPy or DeepSpeed) keeps its traceback."""

import sys
from collections.abc import Callable


class UserError(ValueError):
    """Bad input: the message names the field, flag or file and what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded or converted (incomplete, damaged, not DeBERTa-v2/v3
    shaped), or a bad conversion request."""


def require(condition: bool, field: str, message: str) -> None:
    """Raise UserError("field: message") unless condition holds."""
    if not condition:
        raise UserError(f"{field}: {message}")


def exit_code(action: Callable[[], object], failure: int = 1) -> int:
    """A command's exit code: 0 when `action` runs through; `failure` after printing its
    UserError on one line (any other exception keeps its traceback)."""
    try:
        action()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return failure
    return 0
