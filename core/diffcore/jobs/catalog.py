"""The core's jobs. Importing this must stay cheap: job modules import torch inside ``run``."""


def register_jobs(register):
    from diffcore.jobs.generate import GenerateJob, run_generate
    from diffcore.jobs.serve import ServeJob, run_serve
    from diffcore.jobs.train import TrainJob, run_train

    register("generate", run_generate, config=GenerateJob,
             description="Sample images from a model (class labels or prompts) into PNGs and a grid")
    register("train", run_train, config=TrainJob,
             description="Train a model family with a trainer on a dataset; checkpoints, EMA, sample grids")
    register("serve", run_serve, config=ServeJob,
             description="Serve a model over HTTP: generate-job settings as JSON in, PNGs with parameters out")
