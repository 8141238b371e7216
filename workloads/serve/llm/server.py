"""`LLMServer` with the first streamed chunk sent at once.

Ray's `LLMServer` batches a stream's chunks (every `stream_batching_interval_ms`, 50 ms by
default) so that high-concurrency streams cost fewer Ray messages; its `Batcher` also holds the
first token until the first tick, which adds up to one interval to every time-to-first-token
(ray-project/ray#59681). This subclass sends the first chunk as soon as the engine yields it and
batches the rest as Ray does, so TTFT loses that wait while throughput keeps the batching
(bench/RESULTS.md, `serve`, has what it bought and what other overheads remain).
It is the deployment class `app.build_app` gives `build_llm_deployment` unless an llm_config names
its own `server_cls`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from ray.llm._internal.serve.utils.batcher import Batcher
from ray.serve.llm import LLMServer


async def first_chunk_then_batches(
    generator: AsyncGenerator[Any, None], interval_ms: float | None
) -> AsyncGenerator[list[Any], None]:
    """[first item] as soon as it exists, then `Batcher`'s interval batches of the rest."""
    try:
        try:
            first = await generator.__anext__()
        except StopAsyncIteration:
            return
        yield [first]
        async for batch in Batcher(generator, interval_ms=interval_ms).stream():
            yield batch
    finally:
        # A client gone between the first chunk and the batcher: abort the engine request now,
        # not when the generator is garbage-collected.
        await generator.aclose()


class StreamingLLMServer(LLMServer):
    def _batch_output_stream(self, generator):
        interval = self._get_batch_interval_ms()
        if not interval:  # 0: every chunk on its own already
            return super()._batch_output_stream(generator)
        return first_chunk_then_batches(generator, interval)
