"""Batch embedding, vector indexes, clustering and classification over embeddings.

python ray_jobs/embed.py --config ray_jobs/configs/embed/default.yaml
python ray_jobs/build_index.py --config ray_jobs/configs/build_index/default.yaml
python -m workloads.embed.search --index outputs/index --k 5 "how do I open a file"
"""
