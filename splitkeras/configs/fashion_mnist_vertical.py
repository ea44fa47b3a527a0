"""Vertically partitioned Fashion-MNIST: two clients each hold half of every image.

Client 0 holds the left 28x14 half, client 1 the right half; each runs LeNet-5
up to pool1 on its half and the server averages the two cut tensors
(config.vertical.merge) before the rest of LeNet-5. Samples are aligned by id.

  splitkeras train --config=fashion_mnist_vertical \
      --workdir=workdirs/fmnist_vertical
"""

from splitkeras.configs import fashion_mnist_lenet


def get_config(arg=None):
    c = fashion_mnist_lenet.get_config(arg)
    c.topology = "vertical"
    c.num_clients = 2
    c.vertical.merge = "mean"
    return c
