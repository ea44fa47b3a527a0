"""The seed's CIFAR-100 / VGG experiment (66.47% split vs 66.59% single agent).

VGG-16 with batch norm, cut after its first convolution (the cut the seed's
client-FLOPs figures imply).

  python scripts/train.py --config=configs/cifar100_vgg.py --workdir=workdirs/c100
"""

from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model.name = "vgg16"
    c.model.cut = "block1_relu1"
    c.data.name = "cifar100"
    c.train.epochs = 100
    c.train.batch_size = 128
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.01
    c.train.momentum = 0.9
    return c
