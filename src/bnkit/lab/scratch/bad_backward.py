"""A from-scratch BatchNorm whose hand-written backward is not the true gradient.

Its forward is torch's exactly, but its autograd Function treats the batch mean and
variance as constants in backward (``grad * weight / std``), which is only right in eval
mode. `bnkit conform` passes the forward and fails "backward (true gradient)".
"""

import torch
from torch import nn


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        std = torch.sqrt(var + eps)
        xhat = (x - mean) / std
        ctx.save_for_backward(xhat, weight, std)
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, grad):
        xhat, weight, std = ctx.saved_tensors
        dims = [0, *range(2, grad.dim())]
        shape = [1, -1] + [1] * (grad.dim() - 2)
        gx = grad * weight.view(shape) / std  # missing the mean and variance terms
        return gx, (grad * xhat).sum(dims), grad.sum(dims), None


class BadBackwardBatchNorm(nn.Module):
    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x):
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if not self.training:
            xhat = (x - self.running_mean.view(shape)) / torch.sqrt(
                self.running_var.view(shape) + self.eps
            )
            return xhat * self.weight.view(shape) + self.bias.view(shape)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * x.mean(dims))
            self.running_var.mul_(1 - m).add_(m * x.var(dims, unbiased=True))
        return _Norm.apply(x, self.weight, self.bias, self.eps)
