"""The continual-learning baselines of FCIT (arXiv:2503.12897, Table 1) and the server optimizers, at DISCO's budget.

Each baseline is a `federated.Finetune` with some of its answers changed: the same total LoRA rank, rounds, clients
and data; only what a method adds to the local loss, to the LoRA layout or to the server differs.

    ewc.py      Elastic Weight Consolidation: a Fisher-weighted pull towards the previous stage's model
    lwf.py      Learning without Forgetting: distill the previous stage's answers into the new model
    olora.py    O-LoRA: one LoRA subspace per stage, kept orthogonal to the earlier ones
    moelora.py  MoELoRA: LoRA experts mixed per token by a learned router
    server.py   FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi: a wrapper around any strategy (FedOpt)

    python train.py --setting task-hom --method ewc      (lwf | olora | moelora; --server fedadam --aggregate ab)
Tests: python -m pytest -q tests/test_baselines.py tests/test_server.py
"""
from baselines.ewc import EWC, EWCConfig
from baselines.lwf import LwF, LwFConfig
from baselines.moelora import MoELoRA
from baselines.olora import OLoRA, OLoRAConfig

# --method name -> (strategy class, its hyperparameter dataclass or None)
METHODS = {"ewc": (EWC, EWCConfig), "lwf": (LwF, LwFConfig), "olora": (OLoRA, OLoRAConfig), "moelora": (MoELoRA, None)}
