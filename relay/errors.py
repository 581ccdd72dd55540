"""Exceptions relay raises, each mapped to one sysexits code by ``relayctl``.

Every exception's first argument is one sentence meant for an operator;
``relayctl`` prints it to stderr unchanged.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base class of every error relay reports to a user."""

    #: The sysexits code ``relayctl`` exits with for this error.
    exit_code = 70  # EX_SOFTWARE

    def __str__(self) -> str:
        return self.args[0] if self.args else (self.__doc__ or "").strip()


class UsageError(RelayError):
    """The command line or configuration is wrong."""

    exit_code = 64  # EX_USAGE


class ConfigError(UsageError):
    """A configuration file, variable or flag has a bad key or value."""


class BadMessage(RelayError):
    """A message or address was refused at enqueue (never repaired)."""

    exit_code = 65  # EX_DATAERR


class InputNotFound(RelayError):
    """An input file named on the command line does not exist."""

    exit_code = 66  # EX_NOINPUT


class UnknownMessage(RelayError):
    """No message in the spool has that queue id."""

    exit_code = 1


class CannotListen(RelayError):
    """A configured listening address is in use or cannot be bound."""

    exit_code = 69  # EX_UNAVAILABLE


class SpoolUnavailable(RelayError):
    """The spool cannot be reached, is locked, full or not initialised; try again."""

    exit_code = 75  # EX_TEMPFAIL


class MessageInFlight(SpoolUnavailable):
    """The message has a recipient claimed by a relayd right now; try again."""
