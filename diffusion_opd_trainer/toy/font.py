"""A tiny 3x5 bitmap font for the toy world's text-rendering task.

The eight letters were picked from a larger 3x5 alphabet so that every two glyphs differ in at least five of their
fifteen cells (the best any eight-letter subset reaches), every glyph inks all three of its columns (so a column
projection separates glyphs), and no two of them merge into one token under the toy tokenizers (the prompt spells the
string letter by letter for the text encoders).
"""

import numpy as np


__all__ = ["GLYPH_HEIGHT", "GLYPH_WIDTH", "GLYPHS", "LETTERS", "glyph_array"]

GLYPH_WIDTH = 3
GLYPH_HEIGHT = 5

# Rows top to bottom, "#" is ink. Drawn as capitals; prompts spell them in lower case (T5's vocabulary is lower case).
_GLYPH_ROWS = {
    "c": (".##", "#..", "#..", "#..", ".##"),
    "f": ("###", "#..", "##.", "#..", "#.."),
    "j": ("..#", "..#", "..#", "#.#", ".#."),
    "k": ("#.#", "##.", "#..", "##.", "#.#"),
    "s": (".##", "#..", ".#.", "..#", "##."),
    "t": ("###", ".#.", ".#.", ".#.", ".#."),
    "x": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "z": ("###", "..#", ".#.", "#..", "###"),
}

LETTERS = "".join(sorted(_GLYPH_ROWS))


def glyph_array(letter: str) -> np.ndarray:
    """The glyph of `letter` as a `(5, 3)` float array, 1 for ink and 0 for paper."""
    rows = _GLYPH_ROWS[letter.lower()]
    return np.array([[cell == "#" for cell in row] for row in rows], dtype=np.float32)


GLYPHS = {letter: glyph_array(letter) for letter in LETTERS}
