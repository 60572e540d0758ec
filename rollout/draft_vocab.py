"""A pruned drafter vocabulary: the MTP drafter scores only the N most frequent tokens.

On a CPU the drafter's cost is dominated by its LM head, a full-vocabulary matmul per drafted
token (SmolLM2: 49 152 × 576, more than its one decoder block), which made a drafting step cost
1.2–1.7× a plain one (docs/benchmarks.md). FR-Spec (Zhao et al., 2025) and EAGLE-3's draft
vocabulary restrict the drafter to the most frequent tokens; the target model still scores the full
vocabulary when it verifies, so the output distribution is unchanged. Greedy drafts are a point
mass the rejection sampler accepts with the target's probability; a draft outside the subset is
simply never proposed. Probabilistic drafts (``draft_sample_method: probabilistic``) are sampled
from vLLM's ``softmax(logits / T)`` of this head's logits, -inf outside the subset: q is the
drafter's distribution renormalised over the subset, exactly 0 outside it, and the rejection
sampler's min(1, p/q) and residual max(p − q, 0) use that same q tensor (vLLM 0.32
``llm_base_proposer.compute_probs_and_sample_next_token``), so tokens outside the subset still come
out with the policy's probability, through the residual. What pruning can cost is acceptance, when the
token the full head would have drafted lies outside the subset; `coverage` measures how often the
model's own text stays inside it.

The ranking is a JSON file, by default ``draft_vocab.json`` in the checkpoint directory (written by
`mtprl model warmup` from the model's own answers), holding ``token_ids`` ordered by frequency; an
engine configured with ``draft_vocab_size: N`` keeps the first N.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

DRAFT_VOCAB_FILE = "draft_vocab.json"


def rank_tokens(sequences: Iterable[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Token ids by descending frequency in ``sequences`` (ties: smaller id first), with counts."""
    counts = Counter(t for seq in sequences for t in seq)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [t for t, _ in ranked], [c for _, c in ranked]


def coverage(token_ids: Sequence[int], sequences: Iterable[Sequence[int]]) -> float:
    """Fraction of the tokens of ``sequences`` that lie in ``token_ids``."""
    keep = set(token_ids)
    total = hit = 0
    for seq in sequences:
        total += len(seq)
        hit += sum(t in keep for t in seq)
    return hit / total if total else 0.0


def write_draft_vocab(model_dir: str | Path, sequences: Sequence[Sequence[int]], source: str) -> Path:
    """Rank the tokens of ``sequences`` (the model's own responses) into ``model_dir``'s file."""
    ids, counts = rank_tokens(sequences)
    path = Path(model_dir) / DRAFT_VOCAB_FILE
    path.write_text(json.dumps({"source": source, "tokens_counted": sum(counts), "token_ids": ids,
                                "counts": counts}))
    return path


def read_draft_vocab(model_dir: str | Path, size: int, path: str | Path | None = None) -> list[int]:
    """The ``size`` most frequent token ids. Raises FileNotFoundError with what to do when the
    ranking is missing; a ranking shorter than ``size`` is used whole (every token it saw)."""
    p = Path(path) if path else Path(model_dir) / DRAFT_VOCAB_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"draft_vocab_size={size} needs a token ranking at {p}; `mtprl model warmup` writes one "
            f"(or set draft_vocab_size: 0 for the full vocabulary)")
    ids = json.loads(p.read_text())["token_ids"]
    if not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise ValueError(f"{p}: token_ids must be a non-empty list of token ids")
    return sorted(ids[:size])


# ---- inside vLLM's worker (functions passed to `LLM.collective_rpc`) ----------------------------
def install_draft_vocab(worker, token_ids: list[int]) -> int:
    """Replace the drafter's ``compute_logits`` with one over ``token_ids`` only; returns the full
    vocabulary size. Logits outside the subset are -inf, so the proposer's argmax (and a
    probabilistic draft's softmax) stays inside it."""
    import torch

    model = worker.model_runner.drafter.model
    ids = torch.tensor(token_ids, dtype=torch.long)
    vocab = int(model.lm_head.org_vocab_size)
    if int(ids.max()) >= vocab:
        raise ValueError(f"draft vocabulary has token id {int(ids.max())} >= vocabulary size {vocab}")
    model._draft_ids = ids
    refresh_draft_vocab(worker)

    def compute_logits(hidden_states, spec_step_idx: int = 0):
        sub = hidden_states.to(model._draft_weight.dtype) @ model._draft_weight.T
        out = sub.new_full((hidden_states.shape[0], vocab), float("-inf"))
        out[:, model._draft_ids] = sub
        return out

    model.compute_logits = compute_logits
    return vocab


def refresh_draft_vocab(worker) -> bool:
    """Gather the subset's head rows (a copy: indexing with a tensor copies), at install and after
    each weight update (the head may have changed)."""
    model = worker.model_runner.drafter.model
    if getattr(model, "_draft_ids", None) is None:
        return False
    model._draft_weight = model.lm_head.weight.detach()[model._draft_ids]
    return True
