"""The one exception type for mistakes a user can make (missing data, bad override, corrupt file).

Command lines catch it and print its message as a single line with exit code 2; library code raises it
(or a subclass) with a message that names the file or key and says what to do.
"""


class UserError(Exception):
    """A problem in the user's input, reported as one line without a traceback."""
