"""Weight broadcast to engines with tensor parallelism: the group's rank layout (pure), and the
worker side of a TP > 1 engine (`rollout.engine._worker_join_weight_group` /
`_worker_receive_weights`, what ``collective_rpc`` runs on each TP worker) over a real gloo group,
the sender and four workers of two TP-2 engines as threads of this process. The workers are
fakes (no vLLM: CPU engines refuse TP > 1): they record what their model's loaders were given.
Not covered here (no GPU): NCCL, vLLM's multiprocessing executor, and the sharded load itself."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest
import torch

from rollout import engine, weight_transport
from rollout.weight_transport import group_world_size, member_ranks


def test_member_ranks_follow_vllms_offset_plus_worker_rank_layout():
    assert member_ranks([1, 1, 1]) == [[1], [2], [3]]  # TP 1: engine i is rank i + 1, as before
    assert member_ranks([2, 2]) == [[1, 2], [3, 4]]
    assert member_ranks([4, 1, 2]) == [[1, 2, 3, 4], [5], [6, 7]]
    assert group_world_size([4, 1, 2]) == 8 and group_world_size([]) == 1
    ranks = [r for e in member_ranks([3, 2, 2]) for r in e]
    assert ranks == list(range(1, group_world_size([3, 2, 2])))  # every member once, none is the sender
    with pytest.raises(ValueError, match=">= 1"):
        member_ranks([2, 0])


class FakeRunner:
    def __init__(self) -> None:
        self.model = torch.nn.Linear(2, 2)  # its parameters' dtype is what the sender converts to
        self.target: list[tuple[str, torch.Tensor]] = []

    def get_model(self):
        return self.model

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        self.target = [(n, t.clone()) for n, t in weights_iterator]


def test_each_tp_worker_joins_at_its_rank_and_receives_every_tensor(monkeypatch):
    drafted: dict[int, list] = {}
    monkeypatch.setattr(engine, "_reload_drafter",
                        lambda worker, weights: drafted.__setitem__(id(worker), [(n, t.clone()) for n, t in weights]))
    torch.manual_seed(0)
    weights = [("model.embed_tokens.weight", torch.randn(8, 4)),
               ("model.layers.0.mlp.up_proj.weight", torch.randn(6, 4)),
               ("lm_head.weight", torch.randn(8, 4)), ("model.mtp_layers.0.proj.weight", torch.randn(4, 8))]
    shapes = {n: tuple(t.shape) for n, t in weights}
    tp = [2, 2]
    world = group_world_size(tp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    workers = [(SimpleNamespace(rank=w, model_runner=FakeRunner()), first)
               for first in (e[0] for e in member_ranks(tp)) for w in range(2)]
    results, errors = {}, []

    def worker_side(worker, first):
        try:
            assert engine._worker_join_weight_group(worker, address, first, world, "gloo") == "float32"
            results[id(worker)] = engine._worker_receive_weights(worker, shapes, True, True)
            engine._worker_leave_weight_group(worker)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker_side, args=wf) for wf in workers]
    for t in threads:
        t.start()
    group = weight_transport.BroadcastGroup(address, 0, world, "gloo", timeout_s=60)
    sent = weight_transport.send(group, 7, weights, "float32", bucket_bytes=128)
    for t in threads:
        t.join(60)
    group.close()
    assert not errors, errors
    assert sent["buckets"] > 1
    for worker, _ in workers:
        assert results[id(worker)]["version"] == 7
        got = dict(worker.model_runner.target)
        assert sorted(got) == sorted(n for n, _ in weights if "mtp_layers" not in n)
        assert all(torch.equal(got[n], t) for n, t in weights if n in got)  # bit-identical, full tensors
        assert [n for n, _ in drafted[id(worker)]] == ["model.mtp_layers.0.proj.weight"]  # shared head
        assert worker._mtprl_weight_group is None  # left
