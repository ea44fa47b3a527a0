"""Attacks that measure what a split-learning party can learn.

- `reconstruction_attack`: an honest-but-curious server decodes raw inputs
  from cut activations (model inversion); scored by MSE and SSIM.
- `label_leakage`: the party without labels infers binary labels from the
  gradients it receives (Li et al., ICLR 2022); scored by leak AUC.
- `model_completion_attack`: a party without labels completes its trained
  part with a head trained on a few labelled examples (Fu et al., USENIX
  Security 2022); scored by the labels' accuracy.
"""

from splitkeras.privacy.attacks.label_leakage import (
    cosine_scores,
    label_leakage,
    leak_auc,
    norm_scores,
)
from splitkeras.privacy.attacks.model_completion import (
    known_examples,
    model_completion_attack,
)
from splitkeras.privacy.attacks.reconstruction import (
    build_decoder,
    evaluate_reconstruction,
    reconstruction_attack,
    save_grid,
    train_decoder,
)

__all__ = [
    "build_decoder",
    "cosine_scores",
    "evaluate_reconstruction",
    "known_examples",
    "label_leakage",
    "leak_auc",
    "model_completion_attack",
    "norm_scores",
    "reconstruction_attack",
    "save_grid",
    "train_decoder",
]
