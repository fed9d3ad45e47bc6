"""Training: the loop (loop), the step over one global batch (task), checkpoints (checkpoint), the learning-rate
schedule (schedule) and the metrics log (metrics)."""
