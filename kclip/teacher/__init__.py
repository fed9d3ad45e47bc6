"""The frozen LLM teacher: loading it ZeRO-3-sharded (model), fetching the demo's (fetch), its embeddings on disk
(cache, precompute) and their running statistics (stats)."""
