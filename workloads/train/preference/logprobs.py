"""Sequence log-probabilities of preference pairs: the reference pass (Ray Data) and the held-out
evaluation (inside each Ray Train worker).

    from workloads.train.preference.logprobs import tokenize_pair, pair_logps, pair_metrics

Both tokenize a pair exactly as TRL's DPOTrainer does (`tokenize_pair`: the prompt with the
generation prompt, then prompt + completion, the completion starting where the two diverge), and sum
the completion tokens' log-probabilities as its loss does, so a reference log-prob computed here is
the one the trainer would have computed itself.

`ReferenceLogProbs` is the Ray Data stage (a callable class: the reference model loads once per actor)
that adds `ref_chosen_logps` and `ref_rejected_logps` to every pair before training. With those columns
the trainer never runs the reference model: no second model in memory for full fine-tuning, no
reference forward in each step, and the pass itself runs once, on whatever actors the cluster has free,
and is kept as a stage of the job.

`HeldOutPairs` is the evaluation callback: at the start, every `eval_steps` and at the end it scores
the held-out pairs with the policy and the reference and reports reward accuracy, reward margin,
chosen and rejected log-probs and KL(policy || reference) per completion token, whatever the
algorithm (DPO, KTO, ORPO), so the three are compared on one footing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# Metric names, as they reach ray.train.report, metrics.csv and the plots.
HELDOUT_METRICS = (
    "heldout/reward_accuracy",
    "heldout/reward_margin",
    "heldout/logps_chosen",
    "heldout/logps_rejected",
    "heldout/kl",
)


def tokenize_pair(tokenizer, prompt: list, chosen: list, rejected: list) -> dict[str, list[int]]:
    """`prompt_ids`, `chosen_ids`, `rejected_ids` of a conversational pair, as TRL's DPOTrainer
    tokenizes it (trl.trainer.dpo_trainer, `_prepare_dataset`): the completion starts where the
    tokenized prompt (with the generation prompt) and prompt + completion diverge."""
    from trl.data_utils import _tokenize, common_prefix_length

    prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
    prompt_chosen = _tokenize(tokenizer, prompt + chosen)["input_ids"]
    prompt_rejected = _tokenize(tokenizer, prompt + rejected)["input_ids"]
    n = min(
        common_prefix_length(prompt_ids, prompt_chosen),
        common_prefix_length(prompt_ids, prompt_rejected),
    )
    return {
        "prompt_ids": prompt_ids[:n],
        "chosen_ids": prompt_chosen[n:],
        "rejected_ids": prompt_rejected[n:],
    }


def _completion_positions(logits, completion_mask, row: int):
    """Row `row`'s logits at the positions that predict a completion token, in fp32. Selecting them
    before the softmax keeps the vocabulary-wide tensors at completion length (a few hundred
    positions) rather than batch x sequence length."""
    return logits[row, :-1][completion_mask[row, 1:].bool()].float()


def completion_logps(logits, input_ids, completion_mask):
    """Per sequence: the sum of the log-probabilities of its completion tokens (DPO's log pi(y|x)).
    Position t's logits predict token t + 1."""
    import torch

    sums = []
    for row in range(logits.shape[0]):
        scores = _completion_positions(logits, completion_mask, row)
        targets = input_ids[row, 1:][completion_mask[row, 1:].bool()]
        sums.append(torch.log_softmax(scores, dim=-1).gather(-1, targets[:, None]).sum())
    return torch.stack(sums)


def completion_kl(policy_logits, reference_logits, completion_mask):
    """(sum over completion tokens of KL(policy || reference) at that position, token count) per
    sequence: the exact divergence of the next-token distributions over the whole vocabulary, on the
    held-out completions' contexts."""
    import torch

    sums, counts = [], []
    for row in range(policy_logits.shape[0]):
        p = torch.log_softmax(_completion_positions(policy_logits, completion_mask, row), dim=-1)
        q = torch.log_softmax(_completion_positions(reference_logits, completion_mask, row), dim=-1)
        sums.append((p.exp() * (p - q)).sum())
        counts.append(torch.tensor(float(p.shape[0]), device=p.device))
    return torch.stack(sums), torch.stack(counts)


def pair_metrics(
    policy_chosen: np.ndarray,
    policy_rejected: np.ndarray,
    ref_chosen: np.ndarray,
    ref_rejected: np.ndarray,
    *,
    beta: float,
) -> dict[str, float]:
    """DPO's implicit rewards, beta * log(pi / pi_ref), on each pair: the share of pairs whose chosen
    reward beats the rejected one (a tie counts half, so an untrained policy, identical to its
    reference, scores 0.5 rather than TRL's 0), the mean margin, and the policy's mean log-probs."""
    chosen_reward = beta * (np.asarray(policy_chosen) - np.asarray(ref_chosen))
    rejected_reward = beta * (np.asarray(policy_rejected) - np.asarray(ref_rejected))
    margin = chosen_reward - rejected_reward
    wins = (margin > 0).astype(float) + 0.5 * (margin == 0)
    return {
        "heldout/reward_accuracy": float(wins.mean()),
        "heldout/reward_margin": float(margin.mean()),
        "heldout/logps_chosen": float(np.mean(policy_chosen)),
        "heldout/logps_rejected": float(np.mean(policy_rejected)),
    }


def collate_pairs(tokenized: list[dict], *, pad_token_id: int, max_length: int):
    """TRL's DataCollatorForPreference: chosen sequences first, then rejected, right-padded."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collator = DataCollatorForPreference(pad_token_id=pad_token_id, max_length=max_length)
    return collator(tokenized)


def _messages(value: str) -> list[dict[str, str]]:
    return json.loads(value)


# ---------------------------------------------------------------------------------------------
# Ray Data: the reference pass


class ReferenceLogProbs:
    """Ray Data stage (actor pool): `ref_chosen_logps` and `ref_rejected_logps` of each pair under
    the reference model, the base (or SFT) model that training starts from.

    `model` is the job's ModelConfig as JSON. Rows need `prompt`, `chosen`, `rejected` (JSON
    messages); they come out with the two columns added."""

    def __init__(
        self, *, model: str, max_length: int, batch_size: int = 8, precision: str = "auto"
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from workloads.train.config import ModelConfig, load_tokenizer
        from workloads.train.ray_train import resolve_precision

        model_cfg = ModelConfig.model_validate_json(model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_cfg)
        # The dtype the policy trains in (`train.precision`, resolved here, where the GPU is), so
        # the reference is the policy's starting point to the bit, not a rounding of it.
        precision = resolve_precision(precision, self.device == "cuda")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                model_cfg.name_or_path,
                dtype=dtype,
                attn_implementation=model_cfg.attn_implementation,
                trust_remote_code=model_cfg.trust_remote_code,
            )
            .to(self.device)
            .eval()
        )
        self.max_length = max_length
        self.batch_size = batch_size
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        rows = batch.select(["prompt", "chosen", "rejected"]).to_pylist()
        chosen, rejected = [], []
        for start in range(0, len(rows), self.batch_size):
            tokenized = [
                tokenize_pair(
                    self.tokenizer,
                    _messages(r["prompt"]),
                    _messages(r["chosen"]),
                    _messages(r["rejected"]),
                )
                for r in rows[start : start + self.batch_size]
            ]
            inputs = collate_pairs(
                tokenized, pad_token_id=self.pad_token_id, max_length=self.max_length
            )
            ids = inputs["input_ids"].to(self.device)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=ids, attention_mask=inputs["attention_mask"].to(self.device)
                ).logits
            logps = completion_logps(logits, ids, inputs["completion_mask"].to(self.device)).cpu()
            c, r = logps.chunk(2)
            chosen.extend(c.tolist())
            rejected.extend(r.tolist())
        batch = batch.append_column("ref_chosen_logps", pa.array(chosen, pa.float64()))
        return batch.append_column("ref_rejected_logps", pa.array(rejected, pa.float64()))


# ---------------------------------------------------------------------------------------------
# Ray Train worker: the held-out evaluation


def make_heldout_callback(
    pairs: list[dict[str, Any]],
    *,
    beta: float,
    batch_size: int,
    max_length: int,
    eval_steps: int,
):
    """A TrainerCallback scoring `pairs` (dicts with `prompt`, `chosen`, `rejected` as JSON messages,
    and `ref_chosen_logps` / `ref_rejected_logps` when the reference pass ran) at the start of
    training, every `eval_steps` and at the last step, into the log history that
    RayTrainReportCallback reports. Attach the trainer with `callback.attach(trainer)`.

    Every rank runs it (under ZeRO-3 each forward is a collective): the pairs are dealt round-robin,
    each rank scores its share (padded so every rank runs as many batches), and the scores are
    gathered before the metrics are computed."""
    from transformers import TrainerCallback

    class HeldOutPairs(TrainerCallback):
        def __init__(self) -> None:
            self.trainer = None
            self.done_at: int | None = None

        def attach(self, trainer) -> None:
            self.trainer = trainer
            tokenizer = trainer.processing_class
            self.tokenized = [
                tokenize_pair(
                    tokenizer,
                    _messages(p["prompt"]),
                    _messages(p["chosen"]),
                    _messages(p["rejected"]),
                )
                for p in pairs
            ]
            self.pad_token_id = (
                tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id
            )

        def on_train_begin(self, args, state, control, **kwargs):
            self._evaluate(state)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % eval_steps == 0 or state.global_step >= state.max_steps:
                self._evaluate(state)

        def _evaluate(self, state) -> None:
            if not pairs or self.done_at == state.global_step:
                return
            self.done_at = state.global_step
            metrics = self.score()
            metrics["step"] = state.global_step
            state.log_history.append(metrics)
            log.info("held-out pairs at step %d: %s", state.global_step, metrics)

        def score(self) -> dict[str, float]:
            import torch.distributed as dist

            rank, world = 0, 1
            if dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
            mine = list(range(rank, len(pairs), world))
            # Every rank runs as many forwards (under ZeRO-3 each one gathers the weights from all).
            n_batches = math.ceil(math.ceil(len(pairs) / world) / batch_size)
            model = self.trainer.model
            was_training = model.training
            model.eval()
            results: list[tuple] = []
            try:
                for b in range(n_batches):
                    index = mine[b * batch_size : (b + 1) * batch_size]
                    scored = self._score_batch(index or [0])  # a rank with none repeats pair 0
                    if index:
                        results.extend(scored)
            finally:
                model.train(was_training)
            gathered: list[Any] = [results]
            if world > 1:
                gathered = [None] * world
                dist.all_gather_object(gathered, results)
            rows = sorted(r for part in gathered for r in part)
            arr = np.array([r[1:] for r in rows], dtype=float)
            metrics = pair_metrics(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], beta=beta)
            if not np.isnan(arr[:, 4]).any():  # NaN: no reference model at hand (see _reference)
                metrics["heldout/kl"] = float(arr[:, 4].sum() / max(arr[:, 5].sum(), 1.0))
            return metrics

        def _score_batch(self, index: list[int]) -> list[tuple]:
            """(pair, policy chosen, policy rejected, reference chosen, reference rejected,
            summed token KL, completion tokens) for each pair in `index`."""
            import torch

            trainer = self.trainer
            tokenized = [self.tokenized[i] for i in index]
            device = trainer.accelerator.device
            inputs = collate_pairs(tokenized, pad_token_id=self.pad_token_id, max_length=max_length)
            ids = inputs["input_ids"].to(device)
            attention = inputs["attention_mask"].to(device)
            mask = inputs["completion_mask"].to(device)
            with torch.no_grad():
                policy = trainer.model(
                    input_ids=ids, attention_mask=attention, use_cache=False
                ).logits
                logps = completion_logps(policy, ids, mask)
                with self._reference() as reference:
                    if reference is not None:
                        ref_logits = reference(
                            input_ids=ids, attention_mask=attention, use_cache=False
                        ).logits
                        ref_logps = completion_logps(ref_logits, ids, mask)
                        kl, n_tokens = completion_kl(policy, ref_logits, mask)
                    else:
                        ref_logps = torch.tensor(
                            [pairs[i][c] for c in REF_COLUMNS for i in index], device=device
                        )
                        kl = torch.full_like(logps, float("nan"))
                        n_tokens = mask[:, 1:].sum(dim=1).float()
            c, r = logps.chunk(2)
            rc, rr = ref_logps.chunk(2)
            kc, kr = kl.chunk(2)
            nc, nr = n_tokens.chunk(2)
            return [
                (
                    i,
                    c[j].item(),
                    r[j].item(),
                    rc[j].item(),
                    rr[j].item(),
                    (kc[j] + kr[j]).item(),
                    (nc[j] + nr[j]).item(),
                )
                for j, i in enumerate(index)
            ]

        @contextlib.contextmanager
        def _reference(self):
            """The reference model for one forward: the base with the adapters switched off (LoRA:
            no second copy), TRL's reference model (full fine-tuning), or None when only the
            precomputed log-probs exist (full fine-tuning with the reference pass)."""
            from accelerate.utils import is_peft_model
            from trl.trainer.utils import use_adapter

            trainer = self.trainer
            if is_peft_model(trainer.model):
                unwrapped = trainer.accelerator.unwrap_model(trainer.model)
                with use_adapter(unwrapped, adapter_name=None):
                    yield trainer.model
            elif getattr(trainer, "ref_model", None) is not None:
                yield trainer.ref_model
            elif all(c in pairs[0] for c in REF_COLUMNS):
                yield None
            else:
                raise RuntimeError("no reference model and no precomputed reference log-probs")

    return HeldOutPairs()
