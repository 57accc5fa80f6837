"""The one base class of the errors a user fixes by changing an input, not the code."""

from __future__ import annotations


class ExpectedError(Exception):
    """Bad data, bad config, an unreachable server, an unknown model: raised on purpose.

    The CLI prints the message alone (no traceback) and exits with status 2; Prefect tasks do
    not retry it, since trying again cannot fix an input.
    """
