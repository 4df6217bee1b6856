"""Errors a user can cause. The CLI turns them into one line on stderr and exit status 2."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""
