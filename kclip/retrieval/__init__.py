"""Image-text retrieval of a student: the metrics (metrics.py) and a split's embeddings gathered from every rank
(split.py). Below the trainer, whose validator reports them, and below `kclip eval`, which reports them and more."""
