"""The one exception type for mistakes a user can make (missing data, bad override, corrupt file).

Command lines catch it and print its message as a single line with exit code 2; library code raises it
(or a subclass) with a message that names the file or key and says what to do.

A UserError raised inside a DataLoader worker process reaches the main process re-created by torch
(`torch._utils.ExceptionWrapper.reraise`) with the worker's whole traceback as its message. The
constructor recognises that form and keeps only the original one-line message, so the promise "one
line, exit code 2" holds wherever the error surfaces.
"""
from __future__ import annotations

import re

# torch's wrapper message: "Caught <Type> in DataLoader worker process N.\nOriginal Traceback ...\n<module>.<Type>: <msg>"
_WORKER_WRAPPED = re.compile(r"\ACaught (\w+) in (.+?)\.\nOriginal Traceback.*?\n(?:[\w.]+\.)?\1: (.*?)\s*\Z", re.S)


def original_message(message: str) -> str:
    """The worker's own message if `message` is torch's re-raised worker traceback, else `message`."""
    match = _WORKER_WRAPPED.match(message)
    return match.group(3) if match else message


class UserError(Exception):
    """A problem in the user's input, reported as one line without a traceback."""

    def __init__(self, message: str = ""):
        super().__init__(original_message(str(message)))
