"""`mtprl eval` / `services.evaluate`: pass@1, avg@k and pass@k as the module docstring defines
them, graded by the training verifier (real `RewardScorer`, math-verify workers), on the prompts
of the run's own loader and split.

The unit tests drive `evaluate` with `ScriptedEngine`, a stand-in for `RolloutEngine` that returns
given texts (so the metric definitions are checked on known answers); the integration test runs
the real vLLM engine on the tiny guessing policy ("The answer is D.", D roughly uniform; gold is
always 7, so pass@1 is near 0.1)."""

from __future__ import annotations

import json

import pytest

from services.evaluate import evaluate, load_items
from services.spec import DataSpec


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from learner.tiny import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("data") / "toy.jsonl", num_b=4)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A directory with the tiny tokenizer and a config.json: enough for evaluate's checks and
    prompt rendering (the scripted engine never loads weights)."""
    from learner.tiny import make_tokenizer

    d = tmp_path_factory.mktemp("tok")
    make_tokenizer().save_pretrained(d)
    (d / "config.json").write_text("{}")
    return d


class ScriptedEngine:
    """Unit-test stand-in for `rollout.engine.RolloutEngine`: sample j of prompt i answers
    ``answers(i, j)``. Records the sampling settings and seeds it was called with."""

    def __init__(self, answers):
        from rollout.config import EngineConfig

        self.answers = answers
        self.config = EngineConfig(model="scripted", num_speculative_tokens=0)
        self.calls: list[tuple[dict, list[int]]] = []
        self.offset = 0

    def spec_stats(self):
        from rollout.engine import SpecStats

        return SpecStats()

    def generate(self, prompts, sampling, seeds=None):
        from rollout.engine import RolloutBatch, Sample, SpecStats

        self.calls.append((dict(sampling), list(seeds)))
        out = []
        for p, ids in enumerate(prompts):
            for j in range(sampling["n"]):
                text = self.answers(self.offset + p, j)
                out.append(Sample(p, list(ids), [1, 2, 3], text, [0.0] * 3, "stop", 0))
        self.offset += len(prompts)
        return RolloutBatch(out, SpecStats(), 0.01, 3 * len(out))


def test_metric_definitions_on_known_answers(tokenizer_dir, toy_data):
    """Prompt i, sample j is right iff (i + j) % 4 == 0: first samples right for 1/4 of prompts,
    1/4 of all samples right, and with k=4 every prompt has one right sample."""
    data = DataSpec(dataset=f"jsonl:{toy_data}", size=40, held_out_fraction=0.0)
    engine = ScriptedEngine(lambda i, j: "The answer is 7." if (i + j) % 4 == 0 else "The answer is 3.")
    res = evaluate(tokenizer_dir, data, samples=4, temperature=1.0, split="all", engine=engine,
                   batch_prompts=16, progress=False, include_items=True)
    assert res["prompts"] == 40 and res["k"] == 4 and res["samples_generated"] == 4
    assert res["pass_at_1"] == pytest.approx(10 / 40)
    assert res["avg_at_k"] == pytest.approx(0.25)
    assert res["pass_at_k"] == pytest.approx(1.0)
    assert res["outcomes"] == {"ok": 40, "wrong": 120}
    assert [len(s) for _, s in engine.calls] == [16, 16, 8]  # batched, one seed per prompt
    assert len({s for _, seeds in engine.calls for s in seeds}) == 40
    assert res["items"][0]["gold"] == "7" and res["items"][0]["correct"] == [True, False, False, False]


def test_greedy_generates_once_and_counts_it_k_times(tokenizer_dir, toy_data):
    data = DataSpec(dataset=f"jsonl:{toy_data}", size=40, held_out_fraction=0.0)
    engine = ScriptedEngine(lambda i, j: "\\boxed{7}" if i % 2 else "no idea")
    res = evaluate(tokenizer_dir, data, samples=3, temperature=0.0, split="all", engine=engine, progress=False)
    assert engine.calls[0][0]["n"] == 1 and engine.calls[0][0]["temperature"] == 0.0
    assert res["samples_generated"] == 1
    assert res["pass_at_1"] == res["avg_at_k"] == res["pass_at_k"] == pytest.approx(0.5)


def test_items_come_from_the_training_loader_and_split(tokenizer_dir, toy_data):
    from transformers import AutoTokenizer

    from reward.datasets import split

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = DataSpec(dataset=f"jsonl:{toy_data}", size=40, held_out_fraction=0.25, seed=3)
    held, train, every = (load_items(data, s, tok) for s in ("held_out", "train", "all"))
    assert {i.id for i in held}.isdisjoint(i.id for i in train)
    assert len(held) + len(train) == len(every) == 40
    assert [i.id for i in held] == [i.id for i in split(every, 0.25, 3)[1]]
    assert held[0].prompt.startswith("<|im_start|>system")  # rendered with the chat template, as in training


def test_clear_errors(tmp_path, tokenizer_dir, toy_data):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(tmp_path / "missing", DataSpec(dataset=f"jsonl:{toy_data}"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate(tmp_path, DataSpec(dataset=f"jsonl:{toy_data}"))
    with pytest.raises(ValueError, match="empty"):
        evaluate(tokenizer_dir, DataSpec(dataset=f"jsonl:{toy_data}", held_out_fraction=0.0),
                 engine=ScriptedEngine(lambda i, j: ""), progress=False)


def test_cli_errors_name_the_bad_option(tmp_path, toy_data):
    from typer.testing import CliRunner

    from services.cli import _mount, app

    _mount()
    runner = CliRunner(env={"COLUMNS": "400"})  # one line per error (rich wraps at the width)
    r = runner.invoke(app, ["eval", "--model", str(tmp_path / "nope"), "--data", f"jsonl:{toy_data}"])
    assert r.exit_code == 2 and "does not exist" in r.output and "--model" in r.output
    r = runner.invoke(app, ["eval", "--model", str(tmp_path), "--data", "reasoning_gym:nope"])
    assert r.exit_code == 2 and "registers no task 'nope'" in r.output and "--data" in r.output


@pytest.mark.integration
def test_eval_guessing_policy_with_vllm(tmp_path_factory, toy_data):
    """Real engine (MTP drafting on) and verifier through the CLI: the guessing policy is right about
    1 time in 10; with k=8 samples at temperature 1 some prompt gets a 7. Its MTP head is warmed up
    on the policy's kind of answers ("The answer is D."), so the drafter predicts the policy's
    answers: the reported acceptance is the engine's accepted/drafted and well above 0."""
    import random
    import subprocess
    import sys

    from learner.checkpoint import load_policy, save_policy
    from learner.tiny import make_tokenizer, write_guessing_policy
    from learner.warmup import WarmupConfig, warmup_mtp
    from reward.datasets import jsonl_items

    tok = make_tokenizer()
    prompts = [it.prompt for it in jsonl_items(toy_data, tokenizer=tok)]
    models = tmp_path_factory.mktemp("models")
    policy = load_policy(write_guessing_policy(models / "guess", prompts, steps=150, lr=1e-2))
    rng = random.Random(0)
    texts = [tok.encode(p + f"The answer is {rng.randrange(10)}.{tok.eos_token}", add_special_tokens=False)
             for p in prompts for _ in range(2)]
    warmup_mtp(policy, texts, WarmupConfig(epochs=3, batch_size=16, lr=1e-2, loss="ce"), progress=False)
    ckpt = save_policy(policy, models / "guess-warm", tokenizer=tok)
    out = tmp_path_factory.mktemp("eval") / "eval.json"
    r = subprocess.run([sys.executable, "-m", "services.cli", "eval", "--model", str(ckpt), "--data",
                        f"jsonl:{toy_data}", "--split", "all", "--samples", "8", "--temperature", "1.0",
                        "--max-tokens", "16", "--max-model-len", "256", "--kv-cache-gib", "0.1",
                        "--speculative-tokens", "1", "--threads", "1", "--workers", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == json.loads(out.read_text())
    assert res["prompts"] == 40 and res["samples_generated"] == 8
    assert 0.0 < res["avg_at_k"] < 0.4, res  # ~0.1: right only by chance
    assert res["pass_at_k"] >= res["pass_at_1"] and res["pass_at_k"] >= res["avg_at_k"]
    assert sum(res["outcomes"].values()) == 40 * 8 and res["prompt_too_long"] == 0
    assert res["num_speculative_tokens"] == 1
    drafted, accepted = res["spec_num_draft_tokens"], res["spec_num_accepted_tokens"]
    # One drafted token per decoding step of each sequence: at least one per sample that went past its first token.
    assert drafted >= 40 * 8, res
    assert 0 < accepted <= drafted and res["spec_acceptance_rate"] == pytest.approx(accepted / drafted)
    # A warmed-up head: measured 0.997 here (1914 of 1919 drafted tokens accepted).
    assert res["spec_acceptance_rate"] > 0.5, res
