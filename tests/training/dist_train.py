"""Run by test_train_distributed under ``torchrun --nproc_per_node 2``: the tiny model trained by
the real loop for ``argv[2]`` steps, interrupted after half of them and resumed in the same
processes. Only rank 0 writes (log.jsonl, checkpoints)."""

import sys

from diffcore.training.loop import train
from training_standins import ToyImages, full_trainer, settings, tiny_bundle

out, steps = sys.argv[1], int(sys.argv[2])
for stop_after, resume in ((steps // 2, None), (None, "latest")):
    bundle = tiny_bundle()
    trainer = full_trainer(bundle, cond_dropout=0.3)
    s = settings(out, steps=steps, batch_size=8, grad_accum=1, checkpoint_every=steps // 2, resume=resume)
    train(s, bundle=bundle, trainer=trainer, dataset=ToyImages(), output_dir=out, stop_after=stop_after)

from diffcore.cli import end_process_group  # noqa: E402  (as `diffcore run` does after a job)

end_process_group()
