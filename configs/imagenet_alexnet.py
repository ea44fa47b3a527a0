"""The seed's ImageNet / AlexNet experiment (57.1% top-1 split and single).

Needs TFDS imagenet2012 prepared from a manual download; the streaming
ImageNet pipeline is the ImageNet issue's work.

  python scripts/train.py --config=configs/imagenet_alexnet.py \
      --workdir=workdirs/imagenet --config.data.path=/path/to/tensorflow_datasets
"""

from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model.name = "alexnet"
    c.model.cut = "pool1"
    c.data.name = "imagenet2012"
    c.data.download = False  # ImageNet cannot be downloaded by TFDS
    c.train.epochs = 100
    c.train.batch_size = 128
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.01
    c.train.momentum = 0.9
    return c
