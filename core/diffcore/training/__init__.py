"""Training: the loop (``loop.train``), EMA, objectives, optimizers and checkpoints.

``catalog`` registers the trainers without importing torch; the other modules import it.
"""
