"""The training loop: batch -> loss -> backward (accumulated) -> gradient average -> clip ->
optimizer step -> EMA -> log / sample / checkpoint. One function, read top to bottom.

Processes. ``accelerate`` starts the process group (gloo on CPU, NCCL on GPU; ``torchrun`` or
``accelerate launch``) and picks the device. The data sampler gives each rank its contiguous
share of every global batch (``batch_size`` is global, per forward). Gradients are averaged by
hand once per optimizer step rather than by wrapping the network in DDP: a family's bundle
reaches into its network (``DiTBundle.num_classes`` reads ``network.params``), which a DDP
wrapper would hide. Only rank 0 writes files.

Randomness. Noise, timesteps and label dropout for micro batch ``a`` of rank ``r`` at step
``s`` come from a generator seeded with ``(seed, s, a * world_size + r)``: a run on W processes
with A accumulation steps sees the same data and noise as a one-process run with A * W
accumulation steps and the same per-process batch, and resuming needs no generator state.
Global RNG states (model dropout, augmentation in the main process) are saved per rank.

Exact resume. A checkpoint holds weights, EMA, optimizer, the step (the learning rate is a
function of it), the data position and every rank's RNG states, so training 200 steps straight
and 100 + resume + 100 give bit-identical weights on CPU in fp32 (with ``num_workers = 0``, or
deterministic datasets: worker processes restart their own random streams).

Killed runs. Whatever a SIGKILL interrupts (a step, a checkpoint save, a prune, a preview, the
final grid), the disk holds only whole files and whole checkpoint folders plus ``*.tmp`` leftovers
(state.py). At start rank 0 removes those leftovers (saying so), finishes an interrupted
prune and cuts ``log.jsonl`` back to the checkpoint it continues from, so a killed run resumed
with ``resume = "latest"`` ends exactly where one never killed ends
(tests/reliability/test_kill_resume.py).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffcore.data.batching import ShuffledIndices
from diffcore.errors import CheckpointError, ConfigError
from diffcore.training import state
from diffcore.training.ema import EMA
from diffcore.training.memory import check_fits
from diffcore.training.optim import build_optimizer, lr_at


@attrs.define
class TrainResult:
    step: int
    losses: list[tuple[int, float]]          # (step, loss averaged over processes and micro batches)
    checkpoint: Path | None                  # the last checkpoint written
    ema: EMA
    bundle: Any = None                       # the train job sets it: the trained model, for a caller to use
    model: nn.Module | None = None           # what the EMA tracks: the network, or it with trained text encoders


def train(s: Any, *, bundle: Any, trainer: Any, dataset: Any, output_dir: str | Path,
          config: dict[str, Any] | None = None, preview: Callable[[Any, int], None] | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train ``trainer`` on ``dataset`` with the knobs of ``s`` (a ``TrainSettings``).

    ``preview(bundle, step)`` is called on rank 0 every ``s.validate_every`` steps with the EMA
    weights swapped in, in eval mode and without gradients. ``stop_after`` ends the run after
    that step (with a checkpoint) while the schedule still plans for ``s.steps``: a planned
    interruption.
    """
    output_dir = Path(output_dir)
    accelerator = Accelerator(cpu=s.device == "cpu" or not torch.cuda.is_available())
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    if s.batch_size % world:
        raise ConfigError(f"batch_size {s.batch_size} is not divisible by the {world} processes", path="job.batch_size")
    micro_batch = s.batch_size // world
    end = s.steps if stop_after is None else min(stop_after, s.steps)

    # model, optimizer, EMA; ``model``: what they track, the network, or it and the text encoders
    # whose adapters train (``trainer.tracked``, a text-encoder LoRA)
    network: nn.Module = bundle.network.to(device)
    model: nn.Module = trainer.tracked(network) if hasattr(trainer, "tracked") else network
    model.train()
    if s.gradient_checkpointing:
        if not hasattr(network, "gradient_checkpointing"):
            raise ConfigError(f"{type(network).__name__} has no gradient_checkpointing switch",
                              path="job.gradient_checkpointing")
        network.gradient_checkpointing = True
    params = list(trainer.trainable_parameters())
    if world > 1:  # identical starting weights on every rank, as DDP would broadcast them
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    check_fits(model, params, s.optimizer, device)   # stops now, with the figure, a run that cannot fit
    own_lr = getattr(trainer, "own_lr", None)   # a parameter's own rate (text_encoder_lr), None: the job's
    optimizer = build_optimizer(model, params, s.optimizer, lr=s.lr, weight_decay=s.weight_decay,
                                lr_scale=None if own_lr is None else lambda p: (own_lr(p) or s.lr) / s.lr)
    ema = EMA(model, decay=s.ema_decay, warmup=s.ema_warmup)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.mixed_precision == "bf16")

    # data: each rank's share of every global batch, in an order fixed by the seed; a dataset
    # with its own ``batch_sampler`` (aspect-ratio buckets) draws whole batches itself
    make_batches = getattr(dataset, "batch_sampler", None)
    if make_batches is not None:
        sampler = make_batches(s.seed, rank=rank, world_size=world, batch_size=s.batch_size)
    else:
        sampler = ShuffledIndices(len(dataset), s.seed, rank=rank, world_size=world, batch_size=s.batch_size)

    # resume, or seed this process
    step = 0
    root = output_dir / "checkpoints"
    say = (lambda text: print(text, file=sys.stderr)) if main else None
    if main:
        remove_interrupted_writes(output_dir, say)
        state.prune(root, s.keep_last)  # finishes a prune a kill cut short
    path = state.resolve(s.resume, root, warn=say) if s.resume else None
    restored_rng = False
    if path is not None:
        saved = state.load(path, device)
        try:
            if hasattr(trainer, "load_state_dict"):
                trainer.load_state_dict(model, saved["model"])
            else:
                network.load_state_dict(saved["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: the weights do not fit this model: {exc}") from None
        ema.load_state_dict({k: v for k, v in saved["ema"].items() if k in ema.shadow}, saved["state"]["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        sampler.load_state_dict(saved["state"]["sampler"])
        step = saved["state"]["step"]
        if len(saved["rng"]) == world:
            state.set_rng_state(saved["rng"][rank])
            restored_rng = True
        elif main:
            print(f"resuming on {world} processes from a {len(saved['rng'])}-process checkpoint: data and noise "
                  "continue exactly, the global RNG streams (dropout) are reseeded", file=sys.stderr)
        if main:
            print(f"resumed from {path} at step {step}", file=sys.stderr)
    if main:  # the steps logged after the checkpoint (all of them when starting afresh) are about to be redone
        _truncate_log(output_dir / "log.jsonl", step)
    if not restored_rng:
        torch.manual_seed(s.seed + rank)
        random.seed(s.seed + rank)
        np.random.seed(s.seed + rank)
    # the loader's own generator keeps it from drawing worker seeds out of the global RNG
    batching = {"batch_sampler": sampler} if make_batches else {"batch_size": micro_batch, "sampler": sampler}
    loader = DataLoader(dataset, **batching, num_workers=s.num_workers,
                        generator=torch.Generator().manual_seed(s.seed), pin_memory=device.type == "cuda")
    batches = iter(loader)

    losses: list[tuple[int, float]] = []
    last: Path | None = path
    log_file = output_dir / "log.jsonl"
    progress = tqdm(total=end, initial=step, disable=not main or not sys.stderr.isatty(), desc="train")
    t0, logged_at = time.perf_counter(), step
    while step < end:
        lr = lr_at(step, lr=s.lr, warmup_steps=s.warmup_steps, schedule=s.lr_schedule, total_steps=s.steps)
        for group in optimizer.param_groups:   # a group's lr_scale: its own rate's ratio (text_encoder_lr)
            group["lr"] = lr * group.get("lr_scale", 1.0)

        # forward and backward over grad_accum micro batches, gradients summed in .grad
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(s.grad_accum):
            batch = to_device(next(batches), device)
            generator = torch.Generator().manual_seed(_seed(s.seed, step, micro_step * world + rank))
            with autocast:
                loss = trainer.loss(bundle, batch, generator)
            (loss / s.grad_accum).backward()
            loss_sum += loss.detach()
        if world > 1:
            average_gradients(params, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm) if s.max_grad_norm > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        step += 1
        progress.update(1)

        if step % s.log_every == 0 or step == end:
            loss_mean = accelerator.reduce(loss_sum / s.grad_accum, reduction="mean").item()
            losses.append((step, loss_mean))
            if main:
                dt = (time.perf_counter() - t0) / (step - logged_at)
                record = {"step": step, "loss": loss_mean, "lr": lr, "sec_per_step": dt,
                          "grad_norm": None if grad_norm is None else grad_norm.item()}
                output_dir.mkdir(parents=True, exist_ok=True)
                with open(log_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}")
                if progress.disable:
                    print(f"step {step}/{s.steps} | loss {loss_mean:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms/step",
                          file=sys.stderr)
            t0, logged_at = time.perf_counter(), step

        if main and preview is not None and s.validate_every and step % s.validate_every == 0:
            model.eval()
            with ema.applied(model), torch.no_grad(), autocast:
                preview(bundle, step)
            model.train()

        if (s.checkpoint_every and step % s.checkpoint_every == 0) or step == end:
            last = save_checkpoint(root, step, s, network=model, trainer=trainer, ema=ema, optimizer=optimizer, lr=lr,
                                   samples=step * s.grad_accum * s.batch_size, sampler=sampler,
                                   config=config or {}, accelerator=accelerator)
    progress.close()
    return TrainResult(step=step, losses=losses, checkpoint=last, ema=ema, model=model)


def save_checkpoint(root: Path, step: int, s: Any, *, network: nn.Module, trainer: Any, ema: EMA, optimizer: Any,
                    lr: float, samples: int, sampler: Any, config: dict[str, Any],
                    accelerator: Accelerator) -> Path:
    """Gather every rank's RNG states, then rank 0 writes the checkpoint folder atomically. The
    model file holds what ``trainer.state_dict(network)`` returns where the trainer has one (a
    LoRA's adapters, a ControlNet), else the whole network."""
    rngs = [state.rng_state()]
    if accelerator.num_processes > 1:
        rngs = [None] * accelerator.num_processes
        dist.all_gather_object(rngs, state.rng_state())
    path = state.step_dir(root, step)
    if accelerator.is_main_process:
        model = trainer.state_dict(network) if hasattr(trainer, "state_dict") else network.state_dict()
        ema_model = {**model, **ema.state_dict()}  # the same keys: averaged weights, other tensors as they are
        state.save(
            root, step, model=model, ema=ema_model, optimizer=optimizer.state_dict(), rng=rngs,
            scheduler={"lr_schedule": s.lr_schedule, "lr": s.lr, "warmup_steps": s.warmup_steps,
                       "total_steps": s.steps, "last_lr": lr},
            state={"step": step, "samples": samples, "sampler": sampler.state_at(samples),
                   "world_size": accelerator.num_processes, "ema": ema.counters()},
            config=config, keep_last=s.keep_last)
    accelerator.wait_for_everyone()
    return path


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a collated batch on ``device``, nested dicts and lists followed; captions and
    other plain values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple) and any(isinstance(v, torch.Tensor | dict) for v in batch):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def average_gradients(params: list[nn.Parameter], world_size: int, bucket_numel: int = 1 << 25) -> None:
    """All-reduce mean of the gradients in flat buckets (what DDP does after backward)."""
    grads = []
    for p in params:
        if p.grad is None:  # unused this step on this rank; others may have one
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel()
        if i == len(grads) - 1 or size >= bucket_numel or grads[i + 1].dtype != g.dtype:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat /= world_size
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(part.view_as(b))
            bucket, size = [], 0


def remove_interrupted_writes(output_dir: Path, say: Callable[[str], None]) -> None:
    """Delete what a killed run's atomic writers left: ``checkpoints/*.tmp`` (a save or a delete cut
    short) and the ``.NAME.tmp`` files of images and logs that were never renamed into place."""
    stale = state.remove_stale(output_dir / "checkpoints")
    for p in [*output_dir.glob(".*.tmp"), *output_dir.glob("*/.*.tmp")]:
        if p.is_file():
            p.unlink()
            stale.append(p)
    for p in stale:
        say(f"removed {p}, left by an interrupted run")


def _truncate_log(log_file: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step``, dropping a line a kill cut short; replaced atomically."""
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    tmp = log_file.with_name(f".{log_file.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, log_file)


def _seed(*parts: int) -> int:
    """A 64-bit seed mixing ``parts`` (numpy's SeedSequence hash: nearby tuples give unrelated seeds)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0])

