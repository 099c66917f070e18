"""Where a run's files are written so that a crash loses at most a round and never leaves a wrong one.

    checkpoint.py   one atomic checkpoint file with its progress and fingerprint inside; atomic JSON and PNG writes
    results.py      what a finished run writes: results.json, the printed matrix, and the heatmaps (draw_matrix)
"""
