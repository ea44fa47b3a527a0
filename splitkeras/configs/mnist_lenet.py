"""The seed's MNIST / LeNet experiment (the seed: 99.20% SplitNN,
99.18% single agent).

splitkeras train --config=mnist_lenet --workdir=workdirs/mnist
(add --config.method=centralized for the single-agent run)
"""

from splitkeras.configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model.name = "lenet5"
    c.model.cut = "pool1"
    c.data.name = "mnist"
    c.train.epochs = 20
    c.train.batch_size = 64
    return c
