"""Misbehaving tools for the tool runtime and episode tests: each fails in one way on every call."""

import os


def hang(x: int) -> str:
    """Never answers.

    Args:
        x: Anything.
    """
    while True:
        pass


def boom(x: int) -> str:
    """Raises.

    Args:
        x: Anything.
    """
    raise RuntimeError(f"boom {x}")


def crash(x: int) -> str:
    """Kills its process.

    Args:
        x: Anything.
    """
    os._exit(3)


def garbage(x: int) -> dict:
    """Returns something that is not text or an image.

    Args:
        x: Anything.
    """
    return {"x": x}
