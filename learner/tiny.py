"""Tiny random models in the real layout, for fast tests: `mtprl model tiny --out DIR`.

A few-MB Qwen2 backbone with MTP modules and a small byte-level BPE tokenizer trained here on a
built-in corpus (no download), with a ChatML chat template like SmolLM2's. vLLM serves it exactly
like the real model (head size 32 is one the CPU attention backend supports).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from learner.checkpoint import save_policy
from learner.model import PolicyModel

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    words = (
        "the answer is what how many sum of and plus minus times divided by equals compute "
        "calculate find total result number first then so therefore step boxed solve problem "
        "you are a helpful assistant user system question please give final"
    ).split()
    lines = [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += [f"{a} + {b} = {a + b}" for a in range(0, 60, 7) for b in range(0, 40, 3)]
    lines += [f"{a} * {b} = {a * b}" for a in range(2, 20, 3) for b in range(2, 13, 2)]
    lines += ["\\boxed{" + str(n) + "}" for n in range(100)]
    return lines


def make_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    num_mtp: int = 2,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    tie_word_embeddings: bool = True,
) -> PolicyModel:
    """A random `PolicyModel` with ``num_mtp`` heads (deterministic under ``seed``)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.1,
        use_sliding_window=False,
        dtype="float32",
    )
    backbone = Qwen2ForCausalLM(config)
    # Qwen2 has q/k/v biases; give them values so the tests cover them.
    with torch.no_grad():
        for layer in backbone.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(std=0.05)
    with torch.no_grad():  # non-trivial norm weights, so a test can tell pre-norm from post-norm
        for norm in backbone.modules():
            if type(norm).__name__ == "Qwen2RMSNorm":
                norm.weight.add_(torch.randn_like(norm.weight) * 0.2)
    model = PolicyModel.from_backbone(backbone, num_mtp, proj_init="random")
    with torch.no_grad():  # distinct heads, so a test can tell them apart
        for m in model.mtp:
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model


def write_tiny_checkpoint(out_dir: str | Path, num_mtp: int = 2, seed: int = 0) -> Path:
    tokenizer = make_tokenizer()
    model = make_tiny_model(num_mtp=num_mtp, seed=seed, vocab_size=len(tokenizer))
    return save_policy(model, out_dir, tokenizer=tokenizer)


def write_guessing_policy(out_dir: str | Path, prompts: list[str], num_mtp: int = 2, seed: int = 0,
                          steps: int = 150, lr: float = 1e-2, num_layers: int = 2) -> Path:
    """A tiny policy for RL smoke tests: whatever the prompt, it answers "The answer is D." with a
    digit D drawn roughly uniformly, then stops. Made by a few seconds of supervised training of
    the tiny model on ``prompts`` (the rendered prompts the run will use) followed by such answers.

    A task whose gold answer is a fixed digit then starts at ~10 % reward with mixed-reward groups
    from the first step, and RL can only raise it by shifting probability onto that digit — a
    verifiable, dense-enough toy that a random tiny model (near-uniform over 512 tokens) is not.

    vLLM (0.32) serves a MiMo checkpoint only when ``num_layers >= num_mtp``: its MTP weight-name
    remapping (``mtp_layers.i`` → ``mtp_layers.{num_layers + i}``) collides otherwise."""
    import random

    tokenizer = make_tokenizer()
    model = make_tiny_model(num_mtp=num_mtp, seed=seed, vocab_size=len(tokenizer), num_layers=num_layers)
    rng = random.Random(seed)
    eos = tokenizer.eos_token
    opt = torch.optim.AdamW(model.backbone.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows, masks = [], []
        for p in rng.sample(prompts, min(16, len(prompts))):
            ids = tokenizer.encode(p, add_special_tokens=False)
            ans = tokenizer.encode(f"The answer is {rng.randrange(10)}.{eos}", add_special_tokens=False)
            rows.append(ids + ans)
            masks.append([0] * len(ids) + [1] * len(ans))
        width = max(map(len, rows))
        x = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        m = torch.tensor([k + [0] * (width - len(k)) for k in masks], dtype=torch.bool)
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        logits = model.backbone(input_ids=x, attention_mask=attn).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[m[:, 1:]], x[:, 1:][m[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_policy(model, out_dir, tokenizer=tokenizer)


def write_toy_dataset(path: str | Path, gold: str = "7", num_b: int = 10) -> Path:
    """The toy task of the RL smoke tests, as GSM8K-layout JSONL: "what is a plus b" for a in 0..9,
    b in 0..num_b-1, every gold answer ``gold`` (the guessing policy's target)."""
    import json

    path = Path(path)
    path.write_text("".join(json.dumps({"question": f"what is {a} plus {b}", "answer": f"#### {gold}"}) + "\n"
                            for a in range(10) for b in range(num_b)))
    return path
