"""Concepts: k-means centroids over teacher embeddings and the soft labels they give (bank), fitted from the recent
embeddings every rank keeps (buffer)."""
