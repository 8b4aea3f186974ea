"""Training: the loop (``loop.train``), EMA, objectives, optimizers and the saved training state
(``state``: checkpoint folders to resume from; weights files themselves are ``diffcore.io.checkpoint``).

``catalog`` registers the trainers without importing torch; the other modules import it.
"""
