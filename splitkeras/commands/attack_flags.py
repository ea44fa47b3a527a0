"""The flags of the attacks that `privacy-report`, `advise-cut` and
`attack-table` share: the attacker's data and its decoder's training."""

from absl import flags

_AUX = flags.DEFINE_integer(
    "aux_examples",
    1000,
    "Attacker's inputs: the decoder's (input, activation) pairs, the "
    "hijacker's public set.",
)
_EVAL = flags.DEFINE_integer("eval_examples", 512, "Held-out inputs to reconstruct.")
_DECODER_EPOCHS = flags.DEFINE_integer("decoder_epochs", 20, "Decoder training epochs.")


def attack_kwargs() -> dict:
    """The flags' values as the studies' keyword arguments."""
    return {
        "aux_examples": _AUX.value,
        "eval_examples": _EVAL.value,
        "decoder_epochs": _DECODER_EPOCHS.value,
    }
