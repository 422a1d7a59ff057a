"""Train LeNet with bnkit's BatchNorm on the embedded MNIST subset (needs bnkit[report])."""

import torch

from bnkit.lab.data import load
from bnkit.lab.models import lenet
from bnkit.lab.train import accuracy, fit

torch.manual_seed(0)
data = load("embedded")
model = lenet("bnkit")
hist = fit(model, data.train_x, data.train_y, epochs=1, lr=0.9, batch_size=64, seed=0)
print(
    f"{hist.examples_per_s:.0f} examples/s, test accuracy (eval mode): "
    f"{accuracy(model, data.test_x, data.test_y):.1%}"
)
