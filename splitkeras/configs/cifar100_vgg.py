"""The seed's CIFAR-100 / VGG experiment (the seed: 66.59%
SplitNN, 66.47% single agent).

The CIFAR-10 / VGG-16 config with CIFAR-100's data.

  splitkeras train --config=cifar100_vgg --workdir=workdirs/c100
"""

from splitkeras.configs import cifar10_vgg


def get_config(arg=None):
    c = cifar10_vgg.get_config(arg)
    c.data.name = "cifar100"
    return c
