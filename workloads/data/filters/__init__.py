"""Curation steps: quality heuristics, language, toxicity and PII, chained by `pipeline`."""
