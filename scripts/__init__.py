"""Scripts around the experiment: run them from the repository root as modules.

    python -m scripts.sweep    every method on every setting (resumable), then the comparison table
    python -m scripts.bench    the measurements behind the README's speed and identity-token figures
    python -m scripts.bench_gpu  GPU throughput, MFU and memory at LLaVA-1.5-7B's shapes
"""
