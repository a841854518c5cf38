"""Errors a handler raises to fail a command with a message a human can act on."""


class AgentError(Exception):
    """A command failed; ``str(exc)`` is the one-line ``error`` of the reply."""


class NotFoundError(AgentError):
    pass


class ConflictError(AgentError):
    pass


class BlockingTimeout(AgentError):
    """Blocking work did not finish within its timeout."""
