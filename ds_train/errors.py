"""The one error type for problems a user can fix, and the one way every `main()` prints it.

Code raises `UsageError` where it finds the problem (a bad config, flag, file, record, checkpoint or
world size), worded for the user; each console script catches it once in its `main()` and calls
`refuse`, which prints one `prog: ...` line per line of the message and returns exit code 2. Other
exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import logging
import sys

EXIT_REFUSED = 2

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """A problem the user can fix, worded for them; several problems are joined by newlines."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name when there is none)."""
    line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return line[:limit]


def refuse(prog: str, err: BaseException | str) -> int:
    """Print the reason on stderr, one `prog: ` line per message line (traceback at debug level); exit code 2."""
    if isinstance(err, BaseException):
        log.debug("stopping", exc_info=err)
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    else:
        lines = [err]
    for line in lines:
        print(f"{prog}: {line}", file=sys.stderr, flush=True)
    return EXIT_REFUSED
