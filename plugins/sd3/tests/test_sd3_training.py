"""The training contract: ``training_inputs`` gives the MMDiT's text conditioning for a captioned
batch (dropped to the empty prompt for CFG), and the core's full trainer takes a step on it with
SD3's logit-normal timestep sampling."""

import torch

from diffcore.api import registry, structure
from diffcore.testing import plugins_for_test
from diffcore_sd3.bundle import SD3Bundle
from diffcore_sd3.load import load_transformer
from diffcore_sd3.text import SD3TextEncoder


def test_full_trainer_steps_on_sd3(tiny_pipeline):
    folder, _ = tiny_pipeline
    text = SD3TextEncoder.from_folder(folder, max_length=8)
    bundle = SD3Bundle(network=load_transformer(folder).train(), text=text)
    captions = ["a red cat", "a blue dog"]
    inputs = bundle.training_inputs({"caption": captions})
    context, y = text.encode(captions)
    assert torch.equal(inputs["context"], context) and torch.equal(inputs["y"], y)
    dropped = bundle.training_inputs({"caption": captions}, dropout=1.0, generator=torch.Generator().manual_seed(0))
    empty = text.encode([""])   # what a text cache stores as the empty prompt, one row for every dropped caption
    assert torch.equal(dropped["context"], empty[0].expand(2, -1, -1)) and torch.equal(dropped["y"], empty[1].expand(2, -1))

    with plugins_for_test():
        full = registry("trainers").get("full")
        trainer = full.factory(structure({"timestep_sampling": "logit-normal", "cond_dropout": 0.1}, full.config),
                               bundle)
    optimizer = torch.optim.SGD(trainer.trainable_parameters(), lr=1e-2)
    # cached VAE latents (what bundle.encode returns) are x0 as they are
    batch = {"latents": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)), "caption": captions}
    before = bundle.network.final_layer.linear.weight.detach().clone()
    loss = trainer.loss(bundle, batch, torch.Generator().manual_seed(2))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.item() > 0
    assert not torch.equal(before, bundle.network.final_layer.linear.weight)
    assert bundle.network.joint_blocks[0].x_block.attn.qkv.weight.grad.abs().sum() > 0
