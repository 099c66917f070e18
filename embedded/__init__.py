"""The embedded benchmark and its tiny base: what `python train.py` runs on when no --data / --model is given.

    benchmark.py   the 12 FCIT datasets drawn with pillow, written in the official release layout
    draw.py        the masks of its objects: shapes, renditions, die faces, glyphs, lines
    pretraining.py the base's pretraining mixture (no task instruction) and the benchmark's vocabulary
    base.py        the tiny LLaVA (tokenizer, processor, model) and its pretraining on generic image-text pairs
"""
