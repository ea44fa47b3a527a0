"""The seed's ImageNet / AlexNet experiment (57.1% top-1 split and single).

Reads TFDS imagenet2012, prepared from a manual download (see
splitkeras/data/imagenet.py and README "Scaling out"), as a stream: each
client reads its own shard of the training files, with random-resized crops
and flips; evaluation takes center crops of the validation split and logs
top-1 and top-5 accuracy. The server can run on all GPUs of its machine:

  python scripts/train.py --config=configs/imagenet_alexnet.py \
      --workdir=workdirs/imagenet --config.data.path=/path/to/tensorflow_datasets \
      --config.num_clients=2 --config.server.strategy=mirrored \
      --config.train.mixed_precision=mixed_float16
"""

from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model.name = "alexnet"
    c.model.cut = "pool1"  # after the first conv block, as in the seed
    c.data.name = "imagenet2012"
    c.data.download = False  # ImageNet cannot be downloaded by TFDS
    c.data.image_size = 224  # AlexNet's crops
    c.train.epochs = 100
    c.train.batch_size = 128  # per client step
    c.train.eval_batch_size = 250
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.01
    c.train.momentum = 0.9
    c.train.metrics = "accuracy,top5"
    c.privacy.leakage_examples = 0  # no fixed test arrays in a stream
    return c
