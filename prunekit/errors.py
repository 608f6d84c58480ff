"""Errors that reach the user as one clear line and exit code 2 (no traceback)."""


class UserError(Exception):
    """Bad input or a missing resource the user can fix; the message says which field and what is accepted."""


class EnvironmentFault(Exception):
    """A fault of the machine rather than the input (a full disk, an I/O error): one line, exit code 1."""
