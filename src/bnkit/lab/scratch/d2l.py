"""The from-scratch BatchNorm of Dive into Deep Learning (ch. 8.5), as people copy it.

Its mistakes, as `bnkit conform bnkit.lab.scratch.d2l:BatchNorm` reports them:
* it picks batch vs running statistics with ``torch.is_grad_enabled()`` instead of the
  module's training flag (eval without no_grad uses batch statistics; train under no_grad
  uses running ones);
* it stores the biased batch variance in ``moving_var``;
* no ``num_batches_tracked`` and no ``momentum=None``.
Its statistics are plain tensors of shape (1, C, 1, 1) named moving_mean/moving_var and its
parameters gamma/beta; the checker finds them itself.
"""

import torch
from torch import nn


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    if not torch.is_grad_enabled():
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        assert len(X.shape) in (2, 4)
        if len(X.shape) == 2:
            mean = X.mean(dim=0)
            var = ((X - mean) ** 2).mean(dim=0)
        else:
            mean = X.mean(dim=(0, 2, 3), keepdim=True)
            var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        X_hat = (X - mean) / torch.sqrt(var + eps)
        moving_mean = (1.0 - momentum) * moving_mean + momentum * mean
        moving_var = (1.0 - momentum) * moving_var + momentum * var
    Y = gamma * X_hat + beta
    return Y, moving_mean.data, moving_var.data


class BatchNorm(nn.Module):
    def __init__(self, num_features, num_dims):
        super().__init__()
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.moving_mean = torch.zeros(shape)
        self.moving_var = torch.ones(shape)

    def forward(self, X):
        if self.moving_mean.device != X.device:
            self.moving_mean = self.moving_mean.to(X.device)
            self.moving_var = self.moving_var.to(X.device)
        self.moving_mean = self.moving_mean.to(X.dtype)
        self.moving_var = self.moving_var.to(X.dtype)
        Y, self.moving_mean, self.moving_var = batch_norm(
            X, self.gamma, self.beta, self.moving_mean, self.moving_var, eps=1e-5, momentum=0.1
        )
        return Y
