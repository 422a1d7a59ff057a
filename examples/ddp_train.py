"""A small DDP training run with bnkit.SyncBatchNorm on CPU (gloo).

    torchrun --nproc_per_node=2 examples/ddp_train.py

Each process trains LeNet on its shard of the embedded MNIST subset (needs bnkit[report]);
the BatchNorms are synchronised, so every rank sees the statistics of the global batch and
ends with identical running statistics (checked at the end).
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bnkit
from bnkit.lab.data import load
from bnkit.lab.models import lenet
from bnkit.lab.train import accuracy

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
data = load("embedded")
model = bnkit.convert(lenet("bnkit"), to="sync")
ddp = DDP(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.9)
shard = torch.arange(rank, len(data.train_y), world)
x, y = data.train_x[shard], data.train_y[shard]
per_rank = 128 // world
g = torch.Generator().manual_seed(1)
for _epoch in range(2):
    perm = torch.randperm(len(y), generator=g)
    for i in range(0, len(y) - per_rank + 1, per_rank):
        idx = perm[i : i + per_rank]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
        opt.step()
assert bnkit.check_consistency(model) == [], "running statistics differ across ranks"
if rank == 0:
    plain = bnkit.convert(model, to="bnkit")  # single-process eval / export
    print(
        f"world {world}: test accuracy (eval mode) {accuracy(plain, data.test_x, data.test_y):.1%}"
    )
# An orderly shutdown: every rank done with the group (rank 0 evaluates alone above), and
# DDP's reducer, which holds the group and its gloo threads, gone before the group is. A
# rank that destroyed the group and exited while those were alive was killed by
# std::terminate at exit ("terminate called without an active exception"), now and then.
dist.barrier()
del ddp, opt
dist.destroy_process_group()
