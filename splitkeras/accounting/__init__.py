"""Resource accounting: client FLOPs and bytes per client for each method.

The FLOPs counter is re-exported here; the bandwidth and table functions live
in `splitkeras.accounting.bandwidth` and `splitkeras.accounting.tables`.
"""

from splitkeras.accounting.flops import (
    FlopsReport,
    LayerFlops,
    count_flops,
    training_flops,
)

__all__ = ["FlopsReport", "LayerFlops", "count_flops", "training_flops"]
