"""Errors a user can cause. The CLI turns them into one line on stderr and exit status 2."""

from __future__ import annotations

import re
from collections.abc import Callable

_MENTION = re.compile("\x00([a-z0-9_]+)\x00")


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""


def mention(parameter: str) -> str:
    """Another parameter named inside a `ParameterError`'s text, shown as each face names it."""
    return f"\x00{parameter}\x00"


class ParameterError(UserError):
    """A bad value of one parameter. The Python API shows parameters by name (`target`), the CLI as its flags
    (`--target`), from the same text: `ParameterError("target", f"... lower {mention('space')}")`."""

    def __init__(self, parameter: str, problem: str) -> None:
        self.parameter, self.problem = parameter, problem
        super().__init__(self.render(str))

    def render(self, name_of: Callable[[str], str]) -> str:
        """`parameter problem`, every parameter shown by `name_of`."""
        return _MENTION.sub(lambda m: name_of(m.group(1)), f"{mention(self.parameter)} {self.problem}")
