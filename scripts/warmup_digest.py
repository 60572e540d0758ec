"""The digest of what the demo's MTP warm-up recipe trains, for bisecting the warm-up's numerics.

Runs `learner.warmup.warmup_mtp` with the demo's recipe (distill, 10 epochs, batch 8, lr 3e-3) on a
tiny random policy (`learner.tiny`, one MTP module) and 48 fixed random token sequences, then
prints a JSON line with the SHA-256 of the trained MTP tensors. Two code versions whose digests
are equal train the head bit for bit alike (the trainer and the model's forward); run it from a
worktree of each commit:

    PYTHONPATH=<worktree> .venv/bin/python scripts/warmup_digest.py

(the script itself imports only APIs that exist since the demo was written, 2026-11-22).
"""

import hashlib
import json
import random

import torch

from learner.tiny import make_tiny_model
from learner.warmup import WarmupConfig, warmup_mtp

torch.manual_seed(0)
model = make_tiny_model(num_mtp=1)
rng = random.Random(0)
seqs = [[rng.randrange(3, 500) for _ in range(rng.randrange(8, 40))] for _ in range(48)]
torch.manual_seed(1)
warmup_mtp(model, seqs, WarmupConfig(loss="distill", epochs=10, batch_size=8, lr=3e-3), pad_id=0, progress=False)
h = hashlib.sha256()
for name, t in sorted(model.mtp.state_dict().items()):
    h.update(name.encode())
    h.update(t.detach().contiguous().numpy().tobytes())
print(json.dumps({"mtp_sha256": h.hexdigest()}))
