"""Shared check of the integration tests: vLLM's behaviour log-probs against the learner's."""

from __future__ import annotations

import torch


def max_logprob_error(policy, batch, temperature: float = 1.0) -> float:
    """Max |vLLM sampled-token log-prob − learner main-head log-prob| over a batch's samples, the
    learner's at ``temperature`` (the batch's sampling temperature; 1 for greedy batches)."""
    err = 0.0
    for s in batch.samples:
        ids = torch.tensor([s.prompt_token_ids + s.token_ids])
        with torch.no_grad():
            ours = policy.token_logprobs(ids, num_mtp=0, temperature=temperature).logprobs[0, 0, len(s.prompt_token_ids) :]
        err = max(err, (ours - torch.tensor(s.logprobs)).abs().max().item())
    return err
