"""ResNet-50 on CIFAR-100: the seed's bandwidth table (SplitNN vs FL vs LBS).

ResNet-50 (keras.applications) on CIFAR-100 upscaled to 224x224, cut after
its stem (pool1_pool, 56x56x64 per example). The seed reports 6 / 3 / 13 GB
per client at 100 clients and 1.2 / 2.4 / 14 GB at 500 (SplitNN / FL /
large-batch SGD): SplitNN wins once there are enough clients.

  splitkeras resource-table --config=cifar100_resnet50
  splitkeras train --config=cifar100_resnet50 --workdir=...
"""

from splitkeras.configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model.name = "resnet50"
    c.model.cut = "pool1_pool"
    c.data.name = "cifar100"
    c.train.epochs = 20
    c.train.batch_size = 128
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.1
    c.accounting.num_examples = 50000
    c.accounting.input_shape = "224,224,3"
    c.accounting.num_classes = 100
    # Each client's minibatch in large-batch SGD (the large batch is K of them).
    c.accounting.batch_size = 32
    return c
