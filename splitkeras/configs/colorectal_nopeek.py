"""The seed's NoPeek setting: colorectal histology, leakage vs accuracy.

Vepakomma et al. (NoPeek, 2020) measured the distance correlation between
raw colorectal histology tiles and the cut activations: 0.92 for a plain
SplitNN, 0.33 with NoPeekNN, at about the same accuracy. TFDS
`colorectal_histology` (5,000 tiles of 150x150x3, 8 tissue classes; TFDS has
only a train split, so 20% of it becomes the test split) with ResNet-18 cut
after its stem, NoPeek alpha 0.5.

  splitkeras train --config=colorectal_nopeek --workdir=workdirs/crc
  splitkeras privacy-report --config=colorectal_nopeek \
      --workdir=workdirs/crc_privacy

Needs internet for the TFDS download; on a machine without it, run the same
report on Fashion-MNIST (splitkeras/configs/fashion_mnist_lenet.py).
"""

from splitkeras.configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model.name = "resnet18"
    c.model.cut = "stem_relu"
    c.data.name = "colorectal_histology"
    c.train.epochs = 20
    c.train.batch_size = 32
    c.privacy.nopeek_alpha = 0.5
    return c
