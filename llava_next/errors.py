"""The base of every error that is the user's to fix (a bad file, option, prompt or image).

Each part of the package raises its own subclass (CheckpointError, ImageError, ...); the command line catches this
one class and prints its message as one line, so no caller needs to know every part's errors.
"""


class LlavaError(Exception):
    """A problem the user can fix; the message names it and says what to do."""


class LlavaWarning(UserWarning):
    """Something the package did as asked that may not be what the user meant; the command line prints it as one
    line (`llava-next: warning: ...`)."""


def counted(n: int, noun: str) -> str:
    """"1 image", "2 images": a count in a message."""
    return f"{n} {noun}{'s' * (n != 1)}"
