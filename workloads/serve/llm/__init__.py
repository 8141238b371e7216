"""Serving LLMs with vLLM on Ray Serve (`ray.serve.llm`): an OpenAI-compatible app with multi-LoRA,
authentication, readiness and backpressure, the same YAML on a laptop and on KubeRay."""
