"""Drawing the embedded benchmark's objects: boolean masks of shapes, renditions, die faces, glyphs and lines on
the 8x8 cell of a 32x32 scene (embedded/benchmark.py places and colors them).

    python -c "from embedded.draw import shape_mask; print(shape_mask('triangle').astype(int))"
Tests: python -m pytest -q tests/test_embedded.py
"""
import numpy as np
from PIL import Image, ImageDraw

CELL, GRID = 8, 4                      # 8x8 px cells, 4x4 grid -> a 32x32 image, one cell per vision patch
SIZE = CELL * GRID
# 3x5 bitmap glyphs for the OCR-like and table-like datasets (rows top to bottom)
GLYPHS = dict(zip("abcdefghijklmnopqrstuvwxyz0123456789", (
    "010101111101101 110101110101110 011100100100011 110101101101110 111100110100111 111100110100100 "
    "011100101101011 101101111101101 111010010010111 001001001101010 101101110101101 100100100100111 "
    "101111111101101 110101101101101 010101101101010 110101110100100 010101101110011 110101110101101 "
    "011100010001110 111010010010010 101101101101111 101101101101010 101101111111101 101101010101101 "
    "101101010010010 111001010100111 111101101101111 010110010010111 110001010100111 110001010001110 "
    "101101111001001 111100110001110 011100111101111 111001010010010 111101111101111 111101111001110").split()))


def shape_mask(shape, size=CELL):
    """A size x size boolean mask of a shape, designed on the 8x8 grid and scaled by size / 8."""
    m = Image.new("1", (size, size), 0)
    d = ImageDraw.Draw(m)
    k = size / CELL
    if shape == "circle":
        d.ellipse((k, k, 7 * k - 1, 7 * k - 1), fill=1)
    elif shape == "square":
        d.rectangle((k, k, 7 * k - 1, 7 * k - 1), fill=1)
    elif shape == "triangle":
        d.polygon([(4 * k - 0.5, k), (7 * k - 0.5, 7 * k - 0.5), (k - 0.5, 7 * k - 0.5)], fill=1)
    elif shape == "cross":
        d.rectangle((3 * k, k, 5 * k - 1, 7 * k - 1), fill=1)
        d.rectangle((k, 3 * k, 7 * k - 1, 5 * k - 1), fill=1)
    elif shape == "diamond":
        d.polygon([(4 * k - 0.5, 0), (8 * k - 1, 4 * k - 0.5), (4 * k - 0.5, 8 * k - 1), (0, 4 * k - 0.5)], fill=1)
    return np.array(m, dtype=bool)


def styled(mask, style):
    """Renditions: the same class drawn solid, hollow (outline), striped or dotted."""
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    if style == "hollow":
        inner = mask.copy()
        inner[1:-1, 1:-1] = mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        return mask & ~inner
    if style == "striped":
        return mask & (yy % 4 < 2)
    if style == "dotted":
        return mask & (yy % 2 == 0) & (xx % 2 == 0)
    return mask


def dots_mask(n):
    """A die face of n dots (1..6) on the 8x8 grid, 2x2 px each."""
    spots = {1: [4], 2: [0, 8], 3: [0, 4, 8], 4: [0, 2, 6, 8], 5: [0, 2, 4, 6, 8], 6: [0, 2, 3, 5, 6, 8]}[n]
    m = np.zeros((CELL, CELL), bool)
    for s in spots:
        y, x = 1 + 2 * (s // 3), 1 + 2 * (s % 3)
        m[y:y + 2, x:x + 2] = True
    return m


def glyph_mask(ch):
    m = np.zeros((CELL, CELL), bool)
    m[1:6, 2:5] = np.array([int(b) for b in GLYPHS[ch]], bool).reshape(5, 3)
    return m


def line_mask(offset, rising):
    """A 2 px line across the whole image, climbing (or falling) by 3/4 of its height."""
    m = np.zeros((SIZE, SIZE), bool)
    for x in range(SIZE):
        y = offset + (SIZE - 1 - x) * 3 // 4 if rising else offset + x * 3 // 4
        m[max(0, y - 1):y + 1, x] = True
    return m
