"""Quickstart: LeNet-5 split after its first conv block on Fashion-MNIST.

Uses the real Fashion-MNIST IDX files of Debian's dataset-fashion-mnist when
they are installed, else TFDS's fashion_mnist.

  splitkeras train --config=fashion_mnist_lenet \
      --workdir=workdirs/fashion_mnist_lenet
"""

import os

from splitkeras.configs import base

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def get_config(arg=None):
    c = base.get_config(arg)
    c.model.name = "lenet5"
    c.model.cut = "pool1"
    c.data.name = "fashion_mnist"
    if os.path.isdir(DEBIAN_FASHION_MNIST):
        c.data.path = DEBIAN_FASHION_MNIST
    c.train.epochs = 10
    c.train.batch_size = 64
    return c
