"""Batch embedding, vector indexes, clustering and classification over embeddings.

    python ray_jobs/embed.py --config ray_jobs/configs/embed/default.yaml
    python ray_jobs/build_index.py --config ray_jobs/configs/build_index/default.yaml
    python -m workloads.embed.search --index outputs/index --k 5 "how do I open a file"
    python ray_jobs/cluster_docs.py --config ray_jobs/configs/cluster_docs/default.yaml
    python -m workloads.embed.classify make-sample --out data/labelled.jsonl
    python ray_jobs/train_probe.py --config ray_jobs/configs/train_probe/default.yaml

The embeddings table that connects them is defined in `schema.py`; fine-tuning the embedding model
itself is `ray_jobs/finetune_embedder.py` (workloads/train/embedder.py).
"""
