"""DiTBundle: what the core's sampling and training see of the DiT family."""

import math

import pytest
import torch

from diffcore.api import ConfigError, GenerationRequest, resolve_layers
from diffcore_dit.bundle import DiTBundle
from diffcore_dit.model import DiT2D


@pytest.fixture
def bundle(tiny):
    return DiTBundle(network=DiT2D(tiny))


def test_conditions_give_labels_and_the_null_class(bundle):
    for labels in (torch.tensor([0, 3, 4]), [0, 3, 4]):
        cond = bundle.conditions(GenerationRequest(batch=3, labels=labels))
        assert torch.equal(cond["cond"]["y"], torch.tensor([0, 3, 4]))
        assert torch.equal(cond["uncond"]["y"], torch.tensor([5, 5, 5]))
        assert cond["cond"]["y"].dtype == torch.long
        assert bundle.pooled_condition(cond["cond"]) is cond["cond"]["y"]
        assert bundle.sequence_condition(cond["cond"]) is None


def test_out_of_range_label_names_the_class_count(bundle):
    with pytest.raises(ConfigError, match=r"label 5 .* 5 classes \(0..4\)"):
        bundle.conditions(GenerationRequest(batch=2, labels=[1, 5]))


def test_shape_decode_and_prediction_type(bundle, randomize):
    assert bundle.prediction_type == "flow"
    request = GenerationRequest(batch=1, labels=[1])
    assert bundle.latent_shape(request) == (3, 8, 8) and bundle.seq_len(request) == 16  # (8 / 2)^2 patches
    x = torch.randn(2, 3, 8, 8)
    assert bundle.decode(x) is x
    randomize(bundle.network)
    with torch.no_grad():
        assert torch.equal(bundle.forward(x, torch.rand(2).fill_(0.5), y=torch.tensor([1, 2])),
                           bundle.network(x, torch.full((2,), 0.5), torch.tensor([1, 2])))


def test_diffusers_layer_names_alias_ours(bundle):
    layers = resolve_layers(bundle.network, ["transformer_blocks.1.attn1", "blocks.0.attn"], bundle.attention_alias)
    assert layers["transformer_blocks.1.attn1"] is bundle.network.blocks[1].attn.op


def test_label_dropout_rate_is_binomial(bundle):
    n, rate = 20000, 0.1
    labels = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(3))
    y = bundle.training_inputs({"label": labels}, dropout=rate, generator=torch.Generator().manual_seed(0))["y"]
    dropped = y == bundle.num_classes
    assert abs(dropped.float().mean().item() - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    assert torch.equal(y[~dropped], labels[~dropped])
    again = bundle.training_inputs({"label": labels}, dropout=rate, generator=torch.Generator().manual_seed(0))["y"]
    assert torch.equal(y, again)  # the generator alone decides which labels drop


def test_no_dropout_keeps_labels(bundle):
    labels = torch.tensor([0, 1, 2])
    assert torch.equal(bundle.training_inputs({"label": labels, "image": None})["y"], labels)


def test_generation_request_and_conformance(bundle, randomize):
    from diffcore.testing.conformance import check_model_family

    randomize(bundle.network)
    check_model_family(bundle, GenerationRequest(batch=2, labels=torch.tensor([1, 3])))
    assert torch.equal(bundle.conditions(GenerationRequest(batch=3, labels=torch.tensor([2])))["cond"]["y"],
                       torch.tensor([2, 2, 2]))
    unconditional = bundle.conditions(GenerationRequest(batch=2))
    assert torch.equal(unconditional["cond"]["y"], torch.tensor([5, 5]))
    with pytest.raises(ConfigError, match="2 class labels for a batch of 3"):
        bundle.conditions(GenerationRequest(batch=3, labels=torch.tensor([1, 2])))
    with pytest.raises(ConfigError, match="makes 8x8 images, the request asks for height 16"):
        bundle.latent_shape(GenerationRequest(batch=1, height=16))
