"""A run's prompts: the items of `spec.data`, rendered with the model's chat template, split into
training and held-out parts (a stable hash split by item id, so evaluation never sees a training
item)."""

from __future__ import annotations

from reward.datasets import disk_items, humaneval_items, jsonl_items, parquet_items, reasoning_gym_items, split
from reward.schema import RewardItem
from services.spec import RunSpec


def _chat(tokenizer):
    """The tokenizer when it has a chat template (instruct models); None renders plain text."""
    return tokenizer if tokenizer is not None and getattr(tokenizer, "chat_template", None) else None


def all_items(spec: RunSpec, tokenizer=None) -> list[RewardItem]:
    d = spec.data
    tok = _chat(tokenizer)
    common = dict(template=d.template, tokenizer=tok, system=d.system_prompt)
    if d.dataset.startswith("reasoning_gym:"):
        return reasoning_gym_items(d.dataset.split(":", 1)[1], seed=d.seed, size=d.size, **common, **d.task_config)
    table = dict(common, fields=d.fields)
    if d.dataset == "human_eval":
        items = humaneval_items(**common)
    elif d.dataset.startswith("jsonl:"):
        items = jsonl_items(d.dataset.removeprefix("jsonl:"), **table)
    elif d.dataset.startswith("parquet:"):
        items = parquet_items(d.dataset.removeprefix("parquet:"), **table)
    elif d.dataset.startswith("datasets:"):
        items = disk_items(d.dataset.removeprefix("datasets:"), **table)
    else:  # RunSpec validation lists the known datasets
        raise ValueError(f"unknown dataset {d.dataset!r}")
    return items[: d.size]


def train_items(spec: RunSpec, tokenizer=None) -> list[RewardItem]:
    return split(all_items(spec, tokenizer), spec.data.held_out_fraction, spec.data.seed)[0]


def held_out_items(spec: RunSpec, tokenizer=None) -> list[RewardItem]:
    return split(all_items(spec, tokenizer), spec.data.held_out_fraction, spec.data.seed)[1]
