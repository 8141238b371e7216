"""Retrieval-augmented generation on Ray Serve (issue 10, in progress): hybrid retrieval (FAISS
dense + BM25, fused by reciprocal rank) with citations, generating through the LLM app."""
