"""The one exception type for user mistakes: the CLI prints it and exits with code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong value, a mismatched dataset.

    The message names the file or value, what was expected and how to fix it. The CLI
    prints it without a traceback and exits with status 2.
    """


def user_message(error: UserError) -> str:
    """The message of `error` as it was raised, also from a DataLoader worker process.

    PyTorch re-raises a worker's exception in the main process as the same type, with the
    worker's whole traceback as the message ("Caught X in DataLoader worker process 0.
    Original Traceback ... <module>.X: <message>"); the user needs only the last part."""
    text = str(error)
    head = f"{type(error).__module__}.{type(error).__qualname__}: "
    if text.startswith("Caught ") and "Original Traceback" in text and head in text:
        return text[text.rindex(head) + len(head) :].rstrip("\n")
    return text
