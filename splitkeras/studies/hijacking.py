"""A client trained against a hijacking server, with its guard watching.

`hijack` builds a fresh client of a config (its segment, optimizer, tail and
defenses, as a run would) and trains it for `steps` steps against a
`FeatureSpaceHijacker` instead of the honest server. Every `check_every`
steps it measures how well the attacker inverts what the client sends for
private inputs it never saw (SSIM and MSE of f~^-1(f(x)) against x). When
the config's hijack guard (`config.privacy.hijack_probe_every`) raises its
alarm, it records the step and the SSIM the attacker had reached then: a
client that stops at the alarm leaves the attacker that, one that trains on
leaves it the SSIM at the end.
"""

from __future__ import annotations

import tensorflow as tf

from splitkeras import builders
from splitkeras import data as data_lib
from splitkeras.cut import cut
from splitkeras.parties.client import Client
from splitkeras.privacy.attacks.hijacking import FeatureSpaceHijacker
from splitkeras.privacy.attacks.reconstruction import evaluate_reconstruction
from splitkeras.privacy.defenses import from_config
from splitkeras.privacy.label_dp import training_labels
from splitkeras.transport.local import LocalTransport

__all__ = ["hijack"]


def hijack(config, arrays, public, private, steps: int, check_every: int = 100) -> dict:
    """Trains a fresh client of `config` against a hijacker.

    Args:
      config: a single-client split config (vanilla or U-shaped); its
        privacy settings (defenses, the hijack guard) apply.
      arrays: the dataset (`arrays.x_train`, `arrays.y_train`: the client's).
      public: the attacker's public inputs (images as the pipeline gives).
      private: held-out inputs the attacker reconstructs (never trained on).
      steps: training steps.
      check_every: steps between measurements of the attack.

    Returns:
      {"curve": [(step, ssim)], "ssim", "mse" (at the end), "alarm_step"
      (the first step after which the guard's alarm was on, or None),
      "ssim_at_alarm" (None without an alarm), "score" (the guard's last
      score, or None)}.
    """
    segments = cut(builders.build_model(config, arrays), builders.cut_layers(config))
    ushaped = segments.tail is not None
    client = Client(
        segments.client,
        builders.make_optimizer(config),
        tail=segments.tail,
        objective=builders.make_objective(config) if ushaped else None,
        privacy=from_config(config),
    )
    client.build_optimizer()
    attacker = FeatureSpaceHijacker(
        segments.client,
        public,
        server_segment=segments.server if ushaped else None,
        batch_size=int(config.train.batch_size),
        seed=int(config.seed),
    )
    codec_up, codec_down = builders.codecs(config)
    link = LocalTransport(attacker, codec_up=codec_up, codec_down=codec_down)
    step_fn = tf.function(lambda x, y, step: client.train_step(link, step, x, y))
    guard = client.privacy.guard if client.privacy is not None else None
    labels = training_labels(config, arrays.y_train, int(arrays.num_classes), 0)

    def attack() -> dict:
        sent = client.infer(private)[0]
        return evaluate_reconstruction(attacker.decoder, sent, private)

    result = {"curve": [], "alarm_step": None, "ssim_at_alarm": None, "score": None}
    step, epoch = 0, 0
    while step < steps:
        batches = data_lib.train_dataset(
            arrays.x_train, labels, int(config.train.batch_size), config.seed, epoch
        )
        for x, y in batches:
            step_fn(x, y, tf.constant(step, tf.int64))
            step += 1
            if guard is not None and result["alarm_step"] is None and guard.alarm():
                result["alarm_step"] = guard.alarm()
                result["ssim_at_alarm"] = attack()["ssim"]
            if step % check_every == 0 or step == steps:
                result["curve"].append((step, attack()["ssim"]))
            if step == steps:
                break
        epoch += 1
    result.update(attack())
    if guard is not None:
        result["score"] = guard.score()
    return result
