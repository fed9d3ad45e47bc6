"""kclip: a DeepSpeed trainer for Knowledge-CLIP (a CLIP student distilled from an online ZeRO-3 Llama teacher)."""

__version__ = "0.1.0"
