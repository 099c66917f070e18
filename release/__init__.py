"""The official FCIT release's own files beyond its datasets (which data.py reads).

    partitions.py   the release's pre-made client partitions (partitioned_data/), used in place of our Dirichlet
                    partition when they exist for the run's beta, and the stage order of its Task folders
"""
