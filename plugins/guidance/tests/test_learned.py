"""Learned guidance models: shapes, zero start, wrappers, save/load, the processor."""

import pytest
import torch
from guidance_helpers import ForwardCounter, randomize, run

from diffcore.api import CheckpointError, PluginError, registry
from diffcore.testing.conformance import check_guidance_processor
from diffcore_guidance.learned import LearnedGuidance, conditioning_inputs
from diffcore_guidance.models import (AttentionGuidanceModel, ConvGuidanceModel, MLPGuidanceModel,
                                      MultiObjectiveGuidance, StepSpecificGuidanceWrapper, create_attention_guidance_model,
                                      create_conv_guidance_model, create_mlp_guidance_model, load_guidance_model,
                                      save_guidance_model)

CLASSES = 5


def dit_models():
    return {
        "mlp": create_mlp_guidance_model(1, num_classes=CLASSES, hidden_dim=32, num_layers=2, patch=2),
        "attention": create_attention_guidance_model(1, num_classes=CLASSES, hidden_dim=32, num_heads=4, num_layers=1),
        "conv": create_conv_guidance_model(1, num_classes=CLASSES, hidden_channels=16, num_blocks=2),
    }


def inputs(shape=(2, 1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g), torch.randn(shape, generator=g), None, torch.tensor([1, CLASSES]),
            torch.rand(shape[0], generator=g), 3)


@pytest.mark.parametrize("kind", ["mlp", "attention", "conv"])
def test_an_untrained_model_leaves_samples_bit_identical(kind, dit, req):
    model = dit_models()[kind]
    assert torch.equal(model(*inputs()), torch.zeros(2, 1, 8, 8))
    with ForwardCounter(dit.network) as counter:
        guided = run(dit, [LearnedGuidance(model=model, guidance_scale=2.5)], req)
    assert counter.batches == [2] * 4                    # no extra forward of the sampling model
    assert torch.equal(guided, run(dit, [], req))


@pytest.mark.parametrize("kind", ["mlp", "attention", "conv"])
def test_conformance_on_dit_with_trained_looking_weights(kind, dit, req):
    model = randomize(dit_models()[kind], seed=1)
    check_guidance_processor(LearnedGuidance(model=model, guidance_scale=0.5), dit, req)
    assert not torch.equal(run(dit, [LearnedGuidance(model=model, guidance_scale=0.5)], req), run(dit, [], req))


def test_the_processor_reads_class_labels_and_changes_with_them(dit):
    from diffcore.api import GenerationRequest

    model = randomize(dit_models()["conv"], seed=2)
    proc = LearnedGuidance(model=model, guidance_scale=0.3)
    a = run(dit, [proc], GenerationRequest(batch=2, labels=torch.tensor([1, 1])))
    b = run(dit, [proc], GenerationRequest(batch=2, labels=torch.tensor([1, 2])))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_conditioning_inputs_ask_the_bundle(dit):
    """``auto`` takes what the bundle names (DiT: no text, the class labels as the pooled value);
    a key reads that key; None hides it; without a bundle ``auto`` is an error naming the fix."""
    txt, y = torch.randn(2, 3, 4), torch.tensor([0, 1])
    assert conditioning_inputs(dit, {"txt": txt, "y": y}) == (None, y)
    assert conditioning_inputs(dit, {"txt": txt, "y": y}, txt_key="txt", vec_key=None) == (txt, None)
    assert conditioning_inputs(None, {"y": y}, txt_key=None, vec_key="y") == (None, y)
    with pytest.raises(PluginError, match="name the keys instead"):
        conditioning_inputs(None, {"y": y})


def test_text_families_and_packed_latents():
    """FLUX-like inputs: (B, L, C) packed tokens, T5-like text tokens and a pooled vector."""
    g = torch.Generator().manual_seed(0)
    tokens, txt, vec = torch.randn(2, 16, 64, generator=g), torch.randn(2, 7, 12, generator=g), torch.randn(2, 10)
    t = torch.rand(2, generator=g)
    models = [MLPGuidanceModel(64, txt_dim=12, vec_dim=10, hidden_dim=32),
              AttentionGuidanceModel(64, txt_dim=12, vec_dim=10, hidden_dim=32),
              ConvGuidanceModel(16, txt_dim=12, vec_dim=10, hidden_channels=16, patch=2)]
    for model in models:
        randomize(model)
        out = model(tokens, tokens, txt, vec, t, 0)
        assert out.shape == tokens.shape and torch.isfinite(out).all()
        other = model(tokens, tokens, txt + 1, vec, t, 0)
        assert not torch.allclose(out, other), f"{type(model).__name__} ignores the text"


def test_conv_unpacks_tokens_to_the_grid_and_back():
    """The same latent, packed 2x2 into tokens or laid out as an image, gets the same correction."""
    model = randomize(ConvGuidanceModel(4, hidden_channels=8, num_blocks=1, patch=2, grid=(2, 3)))
    g = torch.Generator().manual_seed(0)
    image, pred = torch.randn(1, 4, 4, 6, generator=g), torch.randn(1, 4, 4, 6, generator=g)
    pack = lambda x: x.reshape(1, 4, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 6, 16)  # b (h w) (c p q)
    t = torch.tensor([0.5])
    torch.testing.assert_close(model(pack(image), pack(pred), None, None, t, 0),
                               pack(model(image, pred, None, None, t, 0)))
    with pytest.raises(ValueError, match="not a square grid"):
        ConvGuidanceModel(4, patch=2)(torch.randn(1, 6, 16), torch.randn(1, 6, 16), None, None, t, 0)


def test_step_specific_wrapper_picks_the_model_of_each_step():
    early, late = (randomize(dit_models()["conv"], seed=s) for s in (3, 4))
    wrapper = StepSpecificGuidanceWrapper({(0, 2): early, (2, 4): late})
    img, pred, txt, vec, t, _ = inputs()
    torch.testing.assert_close(wrapper(img, pred, txt, vec, t, 1), early(img, pred, txt, vec, t, 1))
    torch.testing.assert_close(wrapper(img, pred, txt, vec, t, 3), late(img, pred, txt, vec, t, 3))
    assert torch.equal(wrapper(img, pred, txt, vec, t, 7), torch.zeros_like(pred))
    mixed = wrapper(img, pred, txt, vec, t, torch.tensor([0, 3]))   # a training batch from several steps
    torch.testing.assert_close(mixed[0], early(img, pred, txt, vec, t, 0)[0])
    torch.testing.assert_close(mixed[1], late(img, pred, txt, vec, t, 3)[1])
    with pytest.raises(ValueError, match="overlap"):
        StepSpecificGuidanceWrapper({(0, 3): early, (2, 4): late})


def test_multi_objective_is_the_weighted_sum():
    a, b = (randomize(dit_models()["mlp"], seed=s) for s in (5, 6))
    multi = MultiObjectiveGuidance({"aesthetic": a, "detail": b}, {"aesthetic": 1.0, "detail": 0.3})
    x = inputs()
    torch.testing.assert_close(multi(*x), a(*x) + 0.3 * b(*x))
    with pytest.raises(ValueError, match="without a model: style"):
        MultiObjectiveGuidance({"aesthetic": a}, {"style": 1.0})


def test_save_and_load_keep_config_and_weights(tmp_path):
    models = {k: randomize(m, seed=7) for k, m in dit_models().items()}
    nested = MultiObjectiveGuidance({"steps": StepSpecificGuidanceWrapper({(0, 5): models["mlp"],
                                                                           (5, 9): models["conv"]}),
                                     "text": models["attention"]}, {"text": 0.5})
    x = inputs()
    for name, model in [*models.items(), ("nested", nested)]:
        path = save_guidance_model(model, tmp_path / f"{name}.safetensors")
        loaded = load_guidance_model(path)
        assert type(loaded) is type(model) and loaded.config() == model.config()
        assert torch.equal(loaded(*x), model.eval()(*x))
    with pytest.raises(CheckpointError, match="no guidance model config"):
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        load_guidance_model(tmp_path / "plain.safetensors")


def test_the_registered_processor_loads_a_saved_model(tmp_path, dit, req):
    model = randomize(dit_models()["conv"], seed=8)
    path = save_guidance_model(model, tmp_path / "g.safetensors")
    comp = registry("guidance").get("learned")
    proc = comp.factory(comp.config(checkpoint=str(path), guidance_scale=0.4))
    torch.testing.assert_close(run(dit, [proc], req), run(dit, [LearnedGuidance(model=model, guidance_scale=0.4)], req))


def test_requires_grad_trains_through_the_sampler(dit, req):
    from diffcore.api import sample
    from diffcore_guidance.training import euler_with_grad

    model = randomize(dit_models()["mlp"], seed=9)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1, 0, 4)
    for flag in (True, False):
        proc = LearnedGuidance(model=model, guidance_scale=0.5, requires_grad=flag)
        out = sample(dit, noise, dit.conditions(req), sigmas, euler_with_grad, guidance=[proc], disable=True)
        grads = torch.autograd.grad(out.pow(2).mean(), list(model.parameters()), allow_unused=True)
        if flag:
            assert all(g is not None and g.abs().sum() > 0 for g in grads[-2:])   # down to the output layer
        else:
            assert all(g is None for g in grads)
    plain = run(dit, [LearnedGuidance(model=model, guidance_scale=0.5)], req, steps=3)
    torch.testing.assert_close(out, plain)                            # the same sampler as the core's euler
