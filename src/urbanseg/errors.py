"""The one exception type for user mistakes: the CLI prints it and exits with code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong value, a mismatched dataset.

    The message names the file or value, what was expected and how to fix it. The CLI
    prints it without a traceback and exits with status 2.
    """
