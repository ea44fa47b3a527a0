"""The seed's CIFAR-10 / VGG experiment (the seed: 92.43% SplitNN,
92.45% single agent).

VGG-16 with batch norm, cut after its first convolution (the cut the seed's
client-FLOPs figures imply).

  splitkeras train --config=cifar10_vgg --workdir=workdirs/c10
"""

from splitkeras.configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model.name = "vgg16"
    c.model.cut = "block1_relu1"
    c.data.name = "cifar10"
    c.train.epochs = 100
    c.train.batch_size = 128
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.01
    c.train.momentum = 0.9
    # The seed's resource tables: CIFAR-10's 50,000 training images.
    c.accounting.num_examples = 50000
    c.accounting.input_shape = "32,32,3"
    c.accounting.num_classes = 10
    return c
