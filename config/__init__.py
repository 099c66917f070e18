"""How a run is configured (the nanoGPT way: the config beside train.py, not inside it).

    run.py   RunConfig and its nested configs, the presets (default, tiny, paper), the command line, and the checks
             that name a bad flag before any work; the method registry (STRATEGIES)
"""
