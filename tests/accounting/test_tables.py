"""The resource tables script's library part."""

from splitkeras.accounting import tables
from splitkeras.configs import cifar10_vgg
from tests import base


class TablesTest(base.TestCase):
    def test_vgg_table_shows_the_seeds_ratio_and_assumptions(self):
        config = cifar10_vgg.get_config()
        a = tables.assumptions(config)
        split = tables.client_flops(a, "split", 100)
        fedavg = tables.client_flops(a, "fedavg", 100)
        # The seed: 29.4 / 0.1548 = 190x; cut after the first convolution (and
        # its batch norm and ReLU) we count 235.5x: the same order of magnitude.
        self.assertAlmostEqual(fedavg / split, 235.5, delta=1.0)
        self.assertAlmostEqual(tables.client_flops(a, "split", 500) * 5, split)
        text = tables.resource_tables(a, [100, 500])
        self.assertIn("cut at 'block1_relu1'; 50000 training examples", text)
        self.assertIn("| fedavg | 94.15 | 18.83 |", text)
        self.assertIn(
            "SplitNN sends less per client than FedAvg from 215 clients", text
        )
