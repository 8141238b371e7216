"""Deduplication on Ray Data: exact (hash of normalised text) and, later, MinHash-LSH."""
