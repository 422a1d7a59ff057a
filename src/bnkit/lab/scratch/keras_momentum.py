"""A from-scratch BatchNorm ported from Keras: momentum weights the old value.

Mistakes `bnkit conform` names: Keras momentum convention (``m*old + (1-m)*new``; it then
checks the rest with the momentum converted), unbiased variance used to normalize, eps
outside the square root.
"""

import torch
from torch import nn


class KerasStyleBatchNorm(nn.Module):
    def __init__(self, num_features, momentum=0.99, eps=1e-5):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x):
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            mean = x.mean(dims)
            var = x.var(dims)  # unbiased: torch normalizes with the biased one
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean)
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean.view(shape)) / (var.view(shape).sqrt() + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)
