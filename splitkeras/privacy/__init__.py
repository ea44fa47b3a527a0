"""Privacy measurement for split learning: leakage metrics and attacks.

`distance_correlation` is the NoPeekNN leakage measure (and regularizer)
between raw inputs and cut activations; `ClientPrivacy` holds a client's
defenses (NoPeek, activation noise, output-gradient protection) and
`Leakage` measures `leakage_dcor` during training; `splitkeras.privacy.attacks` holds
the attacks that measure leakage empirically (model inversion, label leakage).

Note that the names ``distance_correlation`` (here) and ``label_leakage`` (in
`attacks`) are the functions: import the modules' other names from the
package, e.g. ``from splitkeras.privacy import distance_covariance_squared``.
"""

from splitkeras.privacy import attacks
from splitkeras.privacy.defenses import ClientPrivacy
from splitkeras.privacy.distance_correlation import (
    distance_correlation,
    distance_covariance_squared,
)
from splitkeras.privacy.leakage import Leakage, attach_privacy

__all__ = [
    "ClientPrivacy",
    "Leakage",
    "attach_privacy",
    "attacks",
    "distance_correlation",
    "distance_covariance_squared",
]
