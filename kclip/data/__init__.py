"""Data pipeline: converters to MDS (`kclip prepare ...`), the Twemoji demo dataset, and the streaming loader."""
