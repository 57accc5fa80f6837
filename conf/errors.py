"""The one base class of the errors a user fixes by changing an input, not the code."""

from __future__ import annotations

from collections.abc import Iterator


class ExpectedError(Exception):
    """Bad data, bad config, an unreachable server, an unknown model: raised on purpose.

    The CLI prints the message alone (no traceback) and exits with status 2; Prefect tasks do
    not retry it, since trying again cannot fix an input.
    """


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then the error it was raised from or while handling, and so on back, each once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
