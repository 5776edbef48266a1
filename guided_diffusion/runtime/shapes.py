"""
Image sizes as the flags give them: an int for a square (the reference's only form), or a
(height, width) pair for a rectangle (`--image_size 32,48`). Everything that needs both sides asks
image_hw(); a rectangle with equal sides is the square, so square runs never see a pair.
"""

from ..errors import ScriptError


def parse_image_size(text):
    """
    Parse an --image_size value: "64" -> 64, "32,48" (height, width) -> (32, 48), "64,64" -> 64.

    :param text: the flag's text (an int or a pair is returned as it is, normalised).
    :return: an int for a square, else a (height, width) tuple of ints.
    :raises ScriptError: (a ValueError, so argparse reports it as an invalid value) on anything
        but one or two positive integers.
    """
    if isinstance(text, int):
        sides = [text]
    elif isinstance(text, (tuple, list)):
        sides = list(text)
    else:
        parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
        try:
            sides = [int(p) for p in parts]
        except ValueError:
            raise ScriptError(
                f"image size must be one integer (a square) or height,width like 32,48, got {text!r}"
            ) from None
    if len(sides) not in (1, 2) or any(int(s) < 1 for s in sides):
        raise ScriptError(
            f"image size must be one positive integer or a positive height,width pair, got {text!r}"
        )
    sides = [int(s) for s in sides]
    if len(sides) == 1 or sides[0] == sides[1]:
        return sides[0]
    return tuple(sides)


def image_hw(image_size):
    """(height, width) of an image size given as an int (square) or a (height, width) pair."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def is_square(image_size):
    height, width = image_hw(image_size)
    return height == width


def short_side(image_size):
    """The shorter side: what a rectangle's channel table and attention levels are chosen by."""
    return min(image_hw(image_size))


def format_image_size(image_size):
    """How messages and flags write a size back: "64", or "32,48" for a rectangle."""
    height, width = image_hw(image_size)
    return str(height) if height == width else f"{height},{width}"
