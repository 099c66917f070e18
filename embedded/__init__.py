"""The embedded benchmark and its tiny base: what `python train.py` runs on when no --data / --model is given.

    benchmark.py   the 12 FCIT datasets drawn with pillow, written in the official release layout
    base.py        the tiny LLaVA (tokenizer, processor, model) and its pretraining on generic image-text pairs
"""
