"""A from-scratch BatchNorm2d that reduces over the batch only, per element.

Mistakes `bnkit conform` names: statistics per element (dim 0 only) instead of per
channel over (N, H, W); running_var initialised to 0; running statistics still updated
in eval mode.
"""

import torch
from torch import nn


class PerElementBatchNorm2d(nn.Module):
    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.zeros(num_features))

    def forward(self, x):
        mean = x.mean(0, keepdim=True)
        var = x.var(0, unbiased=False, keepdim=True)
        with torch.no_grad():  # updated in every mode
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.mean((0, 2, 3)))
            self.running_var.mul_(1 - m).add_(m * var.mean((0, 2, 3)))
        if not self.training:
            shape = (1, -1, 1, 1)
            mean, var = self.running_mean.view(shape), self.running_var.view(shape)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
