"""kclip: a DeepSpeed trainer for Knowledge-CLIP (a CLIP student distilled from an online ZeRO-3 Llama teacher)."""

import time

__version__ = "0.1.0"

# time.monotonic() when this process started, as near as kclip can tell (the interpreter's own start-up comes first):
# the start-up log lines count their seconds from here.
STARTED = time.monotonic()


def load(path, device="cpu"):
    """(model, tokenizer, preprocess) of an exported student (`kclip export`), a run folder or a checkpoint folder;
    see kclip.export.load.load. Imported on demand: `import kclip` stays light."""
    from kclip.export.load import load as _load

    return _load(path, device)
