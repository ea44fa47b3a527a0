"""Tests for the model zoo: every registry model, built small."""

from __future__ import annotations

import functools
from typing import NamedTuple

import keras
import numpy as np
import pytest

from splitkeras.models import (
    alexnet,
    available_models,
    build_model,
    default_cut,
    default_tail_cut,
    lenet5,
    resnet18,
    vgg,
)

BATCH = 4

# name -> (input_shape, num_classes, builder kwargs): the smallest real configs.
SMALL = {
    "lenet5": ((28, 28, 1), 10, {}),
    "vgg11": ((32, 32, 3), 10, {"width": 0.125}),
    "vgg13": ((32, 32, 3), 10, {"width": 0.125}),
    "vgg16": ((32, 32, 3), 10, {"width": 0.125}),
    "vgg19": ((32, 32, 3), 10, {"width": 0.125}),
    "alexnet": ((57, 57, 3), 10, {}),  # smallest size: pool5 is 1x1
    "resnet18": ((32, 32, 3), 10, {"width": 0.25}),
    "resnet50": ((32, 32, 3), 100, {}),  # the CIFAR-100 configuration
}


class Built(NamedTuple):
    model: keras.Model
    x: np.ndarray
    logits: np.ndarray


@pytest.fixture(scope="module")
def zoo():
    """Builds each model once (on first use) and runs one forward pass."""
    keras.utils.set_random_seed(0)

    @functools.cache
    def get(name: str) -> Built:
        shape, num_classes, kwargs = SMALL[name]
        model = build_model(name, shape, num_classes, **kwargs)
        x = np.random.default_rng(0).uniform(size=(BATCH, *shape)).astype("float32")
        logits = keras.ops.convert_to_numpy(model(x, training=False))
        return Built(model, x, logits)

    return get


def test_every_registry_model_is_tested():
    assert available_models() == list(SMALL)


@pytest.mark.parametrize("name", list(SMALL))
def test_outputs_logits_of_shape_batch_by_classes(zoo, name):
    model, _, logits = zoo(name)
    assert logits.shape == (BATCH, SMALL[name][1])
    assert np.all(np.isfinite(logits))
    # Softmax rows are non-negative and sum to 1; logits are neither.
    assert not np.allclose(logits.sum(axis=1), 1.0, atol=1e-3)
    assert (logits < 0).any()
    last = model.layers[-1]
    assert last.name == "logits"
    assert last.activation is keras.activations.linear
    for layer in model.layers:
        assert not isinstance(layer, keras.layers.Softmax), layer.name
        assert getattr(layer, "activation", None) is not keras.activations.softmax


@pytest.mark.parametrize("name", list(SMALL))
def test_is_a_flat_functional_model_with_unique_names(zoo, name):
    model = zoo(name).model
    assert len(model.inputs) == 1 and len(model.outputs) == 1
    assert model.layers[0].name == "input"
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    # No nested models: every layer of the graph is a possible cut point.
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)


@pytest.mark.parametrize("name", ["lenet5", "vgg11", "resnet18", "resnet50"])
def test_layer_names_are_stable_across_builds(zoo, name):
    shape, num_classes, kwargs = SMALL[name]
    again = build_model(name, shape, num_classes, **kwargs)
    assert [lyr.name for lyr in again.layers] == [
        lyr.name for lyr in zoo(name).model.layers
    ]


@pytest.mark.parametrize("name", list(SMALL))
def test_default_cut_passes_a_single_tensor(zoo, name):
    model, x, logits = zoo(name)
    cut = model.get_layer(default_cut(name)).output
    client = keras.Model(model.input, cut)
    server = keras.Model(cut, model.output)  # fails if anything else crosses
    split = keras.ops.convert_to_numpy(server(client(x, training=False)))
    assert split.shape == logits.shape
    np.testing.assert_allclose(split, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SMALL))
def test_default_ushaped_cuts_leave_the_classifier_to_the_tail(zoo, name):
    from splitkeras.cut import cut

    model, x, logits = zoo(name)
    segments = cut(model, (default_cut(name), default_tail_cut(name)))
    assert [layer.name for layer in segments.tail.layers[1:]] == ["logits"]
    head = segments.client(x, training=False)
    body = segments.server(head, training=False)
    split = keras.ops.convert_to_numpy(segments.tail(body, training=False))
    np.testing.assert_allclose(split, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, convs", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13), ("vgg19", 16)]
)
def test_vgg_conv_count_matches_paper(zoo, name, convs):
    layers = zoo(name).model.layers
    assert sum(isinstance(lyr, keras.layers.Conv2D) for lyr in layers) == convs
    bns = sum(isinstance(lyr, keras.layers.BatchNormalization) for lyr in layers)
    assert bns == convs
    assert sum(isinstance(lyr, keras.layers.MaxPooling2D) for lyr in layers) == 5


def test_vgg_rejects_unknown_depth():
    with pytest.raises(ValueError, match=r"vgg depth 17 .*\[11, 13, 16, 19\]"):
        vgg(depth=17)


def test_resnet18_blocks_and_projections(zoo):
    names = [layer.name for layer in zoo("resnet18").model.layers]
    assert len([n for n in names if n.endswith("_add")]) == 8
    # Stem and stage 1 have the same width, so only stages 2-4 project.
    assert [n for n in names if n.endswith("_proj_conv")] == [
        f"stage{s}_block1_proj_conv" for s in (2, 3, 4)
    ]


def test_resnet18_cut_inside_a_block_sends_the_skip_too(zoo):
    model, x, logits = zoo("resnet18")
    inner = model.get_layer("stage1_block1_relu1").output
    skip = model.get_layer("stem_relu").output
    with pytest.raises(ValueError, match="not connected"):
        keras.Model(inner, model.output)
    client = keras.Model(model.input, [inner, skip])
    server = keras.Model([inner, skip], model.output)
    split = keras.ops.convert_to_numpy(server(client(x, training=False)))
    assert split.shape == logits.shape
    np.testing.assert_allclose(split, logits, rtol=1e-5, atol=1e-5)


def test_lenet5_parameter_count():
    conv1 = 5 * 5 * 1 * 6 + 6  # 156; same padding keeps 28x28, pool1 -> 14x14
    conv2 = 5 * 5 * 6 * 16 + 16  # 2416; valid -> 10x10, pool2 -> 5x5x16 = 400
    fc1 = 400 * 120 + 120  # 48120
    fc2 = 120 * 84 + 84  # 10164
    logits = 84 * 10 + 10  # 850
    assert conv1 + conv2 + fc1 + fc2 + logits == 61706
    assert lenet5((28, 28, 1), 10).count_params() == 61706


def test_resnet18_full_width_parameter_count():
    def conv(k, cin, cout):
        return k * k * cin * cout  # no bias: BN follows

    def bn(c):
        return 2 * c  # trainable gamma and beta

    stem = conv(3, 3, 64) + bn(64)
    blocks = 0
    for cin, cout in [(64, 64), (64, 128), (128, 256), (256, 512)]:
        proj = conv(1, cin, cout) + bn(cout) if cin != cout else 0
        first = conv(3, cin, cout) + conv(3, cout, cout) + 2 * bn(cout) + proj
        second = 2 * conv(3, cout, cout) + 2 * bn(cout)
        blocks += first + second
    head = 512 * 10 + 10
    # 11,173,962: the count usually quoted for CIFAR ResNet-18.
    assert stem + blocks + head == 11_173_962
    model = resnet18((32, 32, 3), 10)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 11_173_962


def test_alexnet_feature_maps_at_224_match_paper():
    model = alexnet((224, 224, 3), 1000)
    shapes = {n: model.get_layer(n).output.shape[1:] for n in ("pool1", "pool5")}
    assert shapes == {"pool1": (27, 27, 96), "pool5": (6, 6, 256)}
    assert model.get_layer("fc6").kernel.shape == (9216, 4096)


def test_alexnet_rejects_input_below_minimum():
    with pytest.raises(ValueError, match=r"\(56, 56, 3\) is too small.*>= 57"):
        alexnet((56, 56, 3), 10)


def test_build_model_uses_family_defaults():
    model = build_model("lenet5")
    assert model.input_shape == (None, 28, 28, 1)
    assert model.output_shape == (None, 10)


def test_build_model_rejects_argument_fixed_by_name():
    with pytest.raises(ValueError, match="'vgg16' already fixes depth.*depth=11"):
        build_model("vgg16", depth=11)


def test_unknown_model_name_lists_available_models():
    listed = "available models are: lenet5, vgg11, vgg13, vgg16, vgg19, alexnet"
    with pytest.raises(ValueError, match=f"unknown model 'vgg17'; {listed}"):
        build_model("vgg17")
    with pytest.raises(ValueError, match="unknown model 'resnet34'"):
        default_cut("resnet34")
