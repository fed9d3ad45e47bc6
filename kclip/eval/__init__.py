"""Evaluation of trained or exported students: retrieval, zero-shot, probes, attribute datasets (`kclip eval`)."""
