"""The errors a user can fix. The CLI prints their message (no traceback) and exits non-zero;
anything else escaping a command is a bug and keeps its traceback. Set SPARSEMILL_DEBUG=1 (or
pass --debug) to see the traceback of these too."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the input (config, data, files, environment), named in the message."""

    exit_code = 2
    label = "error"


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the offending key."""

    label = "config error"


class DataError(UserError, ValueError):
    """Input data that cannot be used (unreadable file, empty split); the message names the file."""

    label = "data error"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written, or cannot be resumed from."""

    exit_code = 1
    label = "checkpoint error"
