"""Many processes, one experiment: the clients of a round spread across torchrun's processes, same numbers as one.

    torchrun --standalone --nproc-per-node 2 train.py --setting task-hom              # 2 processes on CPU (gloo)
    torchrun --nproc-per-node 8 train.py --data ROOT --model LLAVA --device cuda ...  # one GPU a process (NCCL)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...
    torchrun --nproc-per-node 5 train.py ... --device cuda --parallel balanced        # every batch over 5 GPUs

federated.run_continual asks its world which of the round's clients this process trains (`mine`) and every client's
result, in client order (`gather`); local_train asks which examples of a batch it computes (`share`) and for the
sums over the processes that share the batch (`total`, `reduce`). `federated.Solo` is world size 1, the loop a
reader reads: it trains every client, whole, and exchanges nothing. `World` (--parallel exact, the default) is the
same calls over torch.distributed, one client a process; `Balanced` (--parallel balanced, at the end of this file)
splits every batch over the processes instead. In exact mode:
- Every process derives the round's clients, their routing (DKO runs on every rank, on the same tokens) and their
  random streams from (seed, stage, round, client), never from its rank, so a client's update does not depend on
  which process trained it (at one thread a process: torchrun's default, and the single-process run's to compare).
- Clients go to ranks by size, longest first to the least loaded rank (`balance`): Dirichlet client sizes are
  uneven, and a round lasts as long as its most loaded rank.
- Each rank sends its clients' updates as one flat float32 tensor a client (padded to the same count per rank;
  bf16 and float32 survive the round trip exactly) with `all_gather`; every rank then runs the same server step
  over the same updates in client order, so the new global state is bitwise equal on every rank and to world
  size 1. An `all_reduce` of weighted sums would send one state instead of C (at 100+ clients a round, 100x less),
  but it adds the clients in an order set by the ranks, not bitwise the one-process sum, and DISCO's
  per-subspace SVD needs the factors of every client, not their sum; it is not offered.
- Evaluation: the test batches of every seen task go to ranks the same way (a batch stays whole, so its padding
  and its numbers are those of world size 1) and the answers are gathered before scoring.
Nothing of the frozen base is ever sent. Rank 0 alone writes results, checkpoints and logs (train.main).

Tests: python -m pytest -q tests/test_parallel.py
"""
import os

import torch
import torch.distributed as dist

from federated import Solo

# C clients of a round, G processes (world size), M most clients on one rank, P numbers in one client's update


def balance(sizes, parts):
    """Item indices into `parts` bins of near-equal total size: longest first, each to the least loaded bin (ties:
    the lower index, the lower bin), so every process computes the same bins."""
    bins, load = [[] for _ in range(parts)], [0] * parts
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        b = min(range(parts), key=lambda b: (load[b], b))
        bins[b].append(i)
        load[b] += sizes[i]
    return [sorted(b) for b in bins]


class World(Solo):
    """This process's place among torchrun's: rank, size, and the collectives of the federated loop. A client is
    trained whole by one process, so Solo's share, total, reduce and dropout stream hold as they are."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def mine(self, sizes):
        """The indices of the items (clients, test batches) this rank works on."""
        return balance(sizes, self.size)[self.rank]

    def gather(self, results, sizes, like):
        """[(client_state, loss) for every client in order] on every rank, from this rank's {i: (state, loss)}.
        like: a state with the keys, shapes and dtypes of a client's (the global state)."""
        bins = balance(sizes, self.size)
        M, keys = max(len(b) for b in bins), list(like)
        device = next(iter(like.values())).device
        P = sum(like[k].numel() for k in keys)
        flat = torch.zeros(M, P, dtype=torch.float32, device=device)                       # (M, P)
        loss = torch.zeros(M, dtype=torch.float64, device=device)                          # (M,)
        for j, i in enumerate(bins[self.rank]):
            state, loss[j] = results[i][0], results[i][1]
            flat[j] = torch.cat([state[k].reshape(-1).float() for k in keys])
        flats = [torch.empty_like(flat) for _ in range(self.size)]
        losses = [torch.empty_like(loss) for _ in range(self.size)]
        dist.all_gather(flats, flat)
        dist.all_gather(losses, loss)
        out = [None] * len(sizes)
        for b, members in enumerate(bins):
            for j, i in enumerate(members):
                parts = flats[b][j].split([like[k].numel() for k in keys])
                out[i] = ({k: v.view(like[k].shape).to(like[k].dtype) for k, v in zip(keys, parts)},
                          float(losses[b][j]))
        return out

    def shard_answers(self, answer, gate_of, batches):
        """answer(batch, gate) -> answers, replayed from answers computed up front: this rank answers its share
        of the test batches (in metrics.evaluate_tasks' order), every rank receives all of them."""
        mine = {j: answer(batches[j], gate_of(batches[j])) for j in self.mine([len(b) for b in batches])}
        every = [None] * self.size
        dist.all_gather_object(every, mine)                            # lists of strings, not tensors
        merged = {j: a for part in every for j, a in part.items()}
        replay = iter(merged[j] for j in range(len(batches)))

        def replayed(batch, gate):
            answers = next(replay)
            assert len(answers) == len(batch), "shard_answers: batches out of evaluate_tasks' order"
            return answers
        return replayed

    def barrier(self):
        dist.barrier()


class Balanced(World):
    """--parallel balanced: every process takes part in every client, data-parallel: a batch's examples are split
    over the processes (`share`), their answer tokens and gradients summed with all_reduce (`total`, `reduce`),
    and every process takes the same optimizer step, so all hold the same client state and no exchange is needed
    after the client. A round then lasts sum_i n_i / G example-steps, not the largest rank's clients: the
    Dirichlet stragglers no longer set it (python -m scripts.bench stragglers). The gradients are summed in
    another order than one process sums them, and each process draws the dropout of its own examples, so the
    numbers equal world size 1 within rounding, not bitwise (tests/test_parallel.py states the tolerance)."""

    def __init__(self, rank, size):
        super().__init__(rank, size)
        self.stream = (rank,)
        self.device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces CUDA tensors only

    mine, gather = Solo.mine, Solo.gather                           # every client here, nothing to exchange after

    def share(self, chunk):
        """A contiguous slice of the batch, sizes as equal as they can be (the first len % G get one more)."""
        q, extra = divmod(len(chunk), self.size)
        start = self.rank * q + min(self.rank, extra)
        return chunk[start:start + q + (self.rank < extra)]

    def total(self, tokens):
        t = torch.tensor([float(tokens)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def reduce(self, params, loss):
        """Sum every parameter's gradient (zeros where this process computed none) and the loss over the
        processes, in one flat float32 all_reduce. Every process gets the same sum (gloo's and NCCL's all_reduce
        return the same bits on every rank), so the replicas take the same step and stay equal."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
        dist.all_reduce(flat)
        for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
            p.grad = g.view(p.shape).to(p.dtype)
        return float(flat[-1])


MODES = ("exact", "balanced")


def join(device, mode="exact"):
    """The World (mode exact: one client a process, bitwise world size 1) or Balanced (every batch split over the
    processes) of a process started by torchrun (WORLD_SIZE > 1 in its environment), with the process group
    initialized (NCCL on CUDA, gloo on CPU) and this process's GPU selected; None for a plain `python train.py`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return None
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's workers share its rendezvous store across restarts, so a restarted worker can read the dead
        # attempt's addresses and hang in gloo's (or NCCL's) connect (measured: 1 try in 3; pytorch issue 135712)
        raise SystemExit("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment "
                         "(each attempt then gets a fresh store): TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return (Balanced if mode == "balanced" else World)(dist.get_rank(), dist.get_world_size())
