"""The one exception type for mistakes a user can make (and fix)."""


class MlexpError(Exception):
    """A user-caused error: bad option, missing data, unknown backbone, unreachable server.

    The CLI prints its message on one line and exits with status 2, without a traceback.
    The message says what was wrong and what to do about it.
    """


class RunFailed(Exception):
    """A run that could not go on for a reason outside the user's options (its outbox cannot
    be written: the disk is full or read-only). The CLI prints its message on one line and
    exits with status 1; the run's status and cause are already recorded."""
