"""`algorithm.mtp.lr` on a sharded learner (FSDP2 over a real gloo group of 2 ranks, started with
torch.multiprocessing; no Ray): the MTP modules are AdamW's second group on every rank, and 2 ranks
train the parameters 1 process does. The Ray learner group's own 2-ranks-equals-1 cases are
tests/test_learner_group.py; this one adds the two parameter groups at a head rate 100x the base."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration

CFG = dict(algorithm="grpo", mtp_regime="policy", lr=1e-5, mini_batches=2, micro_batch_size=3, grad_clip=1.0,
           mtp={"distill": {"kind": "topk_ce", "coef": 1.0}, "lr": 1e-3})
STEPS = 3


def _train(rank: int, world: int, init: str | None, out: str) -> None:
    from learner.config import AlgorithmConfig
    from learner.distributed import DataParallel
    from learner.step import Learner
    from learner.tiny import make_tiny_model
    from test_learner_group import _batch

    torch.set_num_threads(1)
    model = make_tiny_model(num_mtp=2, seed=0, vocab_size=64, hidden_size=32)
    dp = DataParallel.init(rank, world, init, "gloo") if world > 1 else None
    learner = Learner(model, AlgorithmConfig(**CFG), dp=dp)
    metrics = [learner.step(_batch(s, 64)) for s in range(STEPS)]
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if rank == 0:
        torch.save({"state": {k: v.detach().clone() for k, v in state.items()}, "metrics": metrics,
                    "groups": [len(g["params"]) for g in learner.opt.param_groups]}, out)


def test_two_ranks_with_an_mtp_lr_train_what_one_process_does(tmp_path):
    from learner.tiny import make_tiny_model

    _train(0, 1, None, str(tmp_path / "one.pt"))
    mp.spawn(_train, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path / "two.pt")), nprocs=2, join=True)
    one, two = (torch.load(tmp_path / f, weights_only=False) for f in ("one.pt", "two.pt"))
    model = make_tiny_model(num_mtp=2, seed=0, vocab_size=64, hidden_size=32)
    names = [n for n, _ in model.named_parameters()]  # a tied LM head once (state_dict names it twice)
    assert one["groups"] == two["groups"] == [sum(not n.startswith("mtp.") for n in names),
                                              sum(n.startswith("mtp.") for n in names)]
    start = model.state_dict()

    def moved(prefix: str) -> float:
        return max(float((one["state"][k] - start[k]).abs().max()) for k in start if k.startswith(prefix))

    # the heads moved at their own rate (measured: 6.0e-3 against 5.9e-5 for the backbone)
    assert moved("mtp.") > 20 * moved("backbone.")
    diff = max(float((one["state"][k] - two["state"][k]).abs().max()) for k in start)
    assert diff <= 1e-2 * moved("mtp.")  # measured 3.9e-7: a head at the base rate on one side would be ~6e-3
    for a, b in zip(one["metrics"], two["metrics"]):
        assert b["optim/lr_mtp"] == a["optim/lr_mtp"] == 1e-3 and b["learner/ranks"] == 2.0
        assert b["loss/mtp_distill"] == pytest.approx(a["loss/mtp_distill"], rel=1e-4)
