"""A trained student outside the trainer: the folder format and its writer (save), loading an export, run or
checkpoint (load), and embedding image files with it (embed)."""
