"""Multi-task Fashion-MNIST: one client segment, two server heads.

The client runs LeNet-5 up to fc2; one server head predicts the 10 classes,
another the coarse group (0 clothing, 1 footwear, 2 bag), each with its own
labels, loss and optimizer.

  splitkeras train --config=fashion_mnist_multitask \
      --workdir=workdirs/fmnist_multitask
"""

from splitkeras.configs import fashion_mnist_lenet


def get_config(arg=None):
    c = fashion_mnist_lenet.get_config(arg)
    c.topology = "multitask"
    c.model.cut = "fc2"
    c.multitask.head_from = "fc2"
    # T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Boot
    c.multitask.groups = "0,0,0,0,0,1,0,1,2,1"
    return c
