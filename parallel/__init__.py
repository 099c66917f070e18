"""Many processes for one experiment (torchrun, torch.distributed): the clients of a round in parallel.

    world.py   the World of a torchrun process: which clients it trains, the exchange of their updates, the
               sharded evaluation; federated.Solo is world size 1
"""
