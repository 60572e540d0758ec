"""Weight transfer by broadcast: the learner's rank 0 sends a policy version to every engine over
a broadcast group of its own (``weight_sync.transport: broadcast``, docs/weights.md).

Member 0 of the group is the sender (learner rank 0, which gathers the full tensors anyway for
checkpoints and the object-store path), then every engine's workers, in the order of the engine
group (`member_ranks`: with tensor parallelism each of an engine's TP workers is a member, joins
and receives in its own process through vLLM's ``collective_rpc``, and loads its shard with the
model's ``load_weights``). The group is a standalone `torch.distributed` backend object (``ProcessGroupGloo`` on the
CPU, ``ProcessGroupNCCL`` on CUDA: the same calls) built over its own ``TCPStore``, never
``init_process_group``: the learner's FSDP default group and vLLM's own torch.distributed state
in the engine's process are left alone (vLLM's ``StatelessProcessGroup`` serves the same purpose;
its docs note a stateless group cannot ``broadcast`` through the global-rank API, which is why the
backend object is called directly here).

One update, every member in the same order:

1. header: the sender broadcasts ``{"version", "bucket_bytes", "tensors": [(name, shape, dtype)]}``
   (a pickled byte tensor, small);
2. handshake: every engine checks the list against its own checkpoint's names and shapes and its
   parameter dtype, and all members all-reduce (MIN) a 1/0 flag, so a refused update fails on
   every member before any weight moves (nobody is left waiting in a broadcast);
3. buckets: tensors in header order are packed into byte buffers of at most ``bucket_bytes``
   (a tensor larger than that travels alone), converted to the engine's dtype once, while being
   copied into the sender's buffer; `bucket_layout` computes the same layout on both sides from
   the header.

An engine keeps each received bucket and hands views of it to its ordinary reload
(`RolloutEngine.update_weights`' path), so the loaded weights equal those of the object-store
path. NCCL: coded, not run here (no GPU on the development machine).
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

TRANSPORTS = ("auto", "object_store", "broadcast")
BUCKET_MIB_DEFAULT = 256
BUCKET_MIB_MIN, BUCKET_MIB_MAX = 1, 8192  # one definition (services.spec.WeightSyncSpec imports them)
GROUP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "bfloat16", ...

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * dtype_of(self.dtype).itemsize


def dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def bucket_layout(metas: list[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``metas`` per bucket, in order: consecutive tensors while they fit in
    ``bucket_bytes``; a larger tensor is a bucket of its own."""
    out: list[list[int]] = []
    size = 0
    for i, m in enumerate(metas):
        if out and size + m.nbytes <= bucket_bytes:
            out[-1].append(i)
            size += m.nbytes
        else:
            out.append([i])
            size = m.nbytes
    return out


def member_ranks(tp_sizes: Sequence[int]) -> list[list[int]]:
    """The group rank of each engine's tensor-parallel workers, engine by engine: the sender is
    rank 0, worker ``w`` of engine ``i`` is ``1 + sum(tp_sizes[:i]) + w``. That is vLLM's own
    layout for a trainer + workers group (``rank_offset`` + the worker's rank within its engine,
    `vllm.distributed.weight_transfer.nccl_common.worker_init_process_group`); with TP 1 it is
    engine i = rank i + 1, as before."""
    if any(int(t) < 1 for t in tp_sizes):
        raise ValueError(f"tensor-parallel sizes must be >= 1: {list(tp_sizes)}")
    out, first = [], 1
    for t in tp_sizes:
        out.append(list(range(first, first + int(t))))
        first += int(t)
    return out


def group_world_size(tp_sizes: Sequence[int]) -> int:
    """Members of the group: the sender and every worker of every engine."""
    return 1 + sum(int(t) for t in tp_sizes)


def free_address() -> str:
    """``host:port`` for a group's store on this node (a free port; the sender listens there)."""
    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


class BroadcastGroup:
    """One member of a weight broadcast group (blocks until every member has joined)."""

    def __init__(self, address: str, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = GROUP_TIMEOUT_S) -> None:
        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend {backend!r}: gloo or nccl")
        host, _, port = address.rpartition(":")
        self.rank, self.world_size, self.backend = int(rank), int(world_size), backend
        timeout = timedelta(seconds=timeout_s)
        self._store = dist.TCPStore(host, int(port), self.world_size, is_master=self.rank == 0, timeout=timeout,
                                    wait_for_workers=False)
        store = dist.PrefixStore("mtprl-weights", self._store)
        if backend == "gloo":
            self.device = torch.device("cpu")
            self._pg = dist.ProcessGroupGloo(store, self.rank, self.world_size, timeout)
        else:  # pragma: no cover - needs CUDA (not run on the development machine)
            self.device = torch.device("cuda", torch.cuda.current_device())
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(store, self.rank, self.world_size, opts)
        # Connect now (gloo connects lazily): a member that cannot be reached fails the join.
        self.all_ok(True)

    def broadcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._pg.broadcast([t], opts).wait()

    def all_ok(self, ok: bool) -> bool:
        """Every member's flag, all-reduced with MIN (True only if every member said True)."""
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self._pg.allreduce([flag], opts).wait()
        return bool(flag.item())

    def broadcast_object(self, obj=None):
        """The sender's ``obj`` on every member (pickled; for the small header only)."""
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            n = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            n = torch.zeros(1, dtype=torch.int64)
        n = n.to(self.device)
        self.broadcast(n)
        if self.rank != 0:
            data = torch.empty(int(n.item()), dtype=torch.uint8)
        buf = data.to(self.device)
        self.broadcast(buf)
        return obj if self.rank == 0 else pickle.loads(buf.cpu().numpy().tobytes())

    def close(self) -> None:
        try:
            self._pg.shutdown()
        except Exception:  # noqa: BLE001 - a peer already gone; the group is dropped either way
            pass
        self._pg = None
        self._store = None


def send(group: BroadcastGroup, version: int, weights: Iterable[tuple[str, torch.Tensor]], dtype: str,
         bucket_bytes: int) -> dict:
    """Sender: header, handshake, then the tensors in buckets converted to ``dtype``. Raises
    ValueError if an engine refused the update (nothing was sent)."""
    weights = list(weights)
    dt = dtype_of(dtype)
    metas = [TensorMeta(n, tuple(t.shape), dtype_name(dt)) for n, t in weights]
    group.broadcast_object({"version": int(version), "bucket_bytes": int(bucket_bytes),
                            "tensors": [(m.name, m.shape, m.dtype) for m in metas]})
    if not group.all_ok(True):
        raise ValueError(f"an engine refused weight version {version} (its error says why); nothing was sent")
    layout = bucket_layout(metas, bucket_bytes)
    largest = max((sum(metas[i].nbytes for i in b) for b in layout), default=0)
    buf = torch.empty(largest, dtype=torch.uint8, device=group.device)  # reused: each broadcast waits
    try:
        for b in layout:
            off = 0
            for i in b:
                m = metas[i]
                buf[off:off + m.nbytes].view(dt).view(m.shape).copy_(weights[i][1])  # the one dtype conversion
                off += m.nbytes
            group.broadcast(buf[:off])
    except Exception:
        # A member died mid-transfer: close our end so the others fail now instead of waiting
        # out the group's timeout; the caller forms a new group.
        group.close()
        raise
    return {"version": int(version), "tensors": len(metas), "buckets": len(layout),
            "bytes": sum(m.nbytes for m in metas)}


def receive(group: BroadcastGroup, check: Callable[[list[TensorMeta]], str | None]
            ) -> tuple[int, list[tuple[str, torch.Tensor]]]:
    """An engine: the header, the handshake (``check`` returns a reason to refuse, or None), then
    the buckets. Returns (version, [(name, tensor)]): views of the received buffers, in the
    sender's dtype and order."""
    header = group.broadcast_object()
    metas = [TensorMeta(n, tuple(s), d) for n, s, d in header["tensors"]]
    try:
        reason = check(metas)
    except Exception as e:  # noqa: BLE001 - a refusal, not a hang: the others learn it below
        reason = f"{type(e).__name__}: {e}"
    if not group.all_ok(reason is None):
        raise ValueError(f"weight version {header['version']} refused" + (f": {reason}" if reason else
                                                                           " by another member"))
    out: list[tuple[str, torch.Tensor]] = []
    for b in bucket_layout(metas, header["bucket_bytes"]):
        buf = torch.empty(sum(metas[i].nbytes for i in b), dtype=torch.uint8, device=group.device)
        group.broadcast(buf)
        off = 0
        for i in b:
            m = metas[i]
            out.append((m.name, buf[off:off + m.nbytes].view(dtype_of(m.dtype)).view(m.shape)))
            off += m.nbytes
    return int(header["version"]), out


def check_against(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> Callable[[list[TensorMeta]], str | None]:
    """An engine's handshake: every tensor named in its checkpoint with that shape, in its dtype."""
    want = dtype_name(dtype)

    def check(metas: list[TensorMeta]) -> str | None:
        bad = [f"{m.name} (unknown)" for m in metas if m.name not in shapes]
        bad += [f"{m.name} shape {m.shape}, expected {tuple(shapes[m.name])}" for m in metas
                if m.name in shapes and tuple(shapes[m.name]) != m.shape]
        bad += [f"{m.name} dtype {m.dtype}, the engine's is {want}" for m in metas if m.dtype != want]
        if not metas:
            bad.append("no tensors")
        return None if not bad else "; ".join(bad[:8]) + (f" (and {len(bad) - 8} more)" if len(bad) > 8 else "")

    return check


def resolve(transport: str, learner_node: str, engine_nodes: list[str], gpus: bool) -> tuple[str, str]:
    """The transport a run uses and why. ``auto``: the object store when the learner's rank 0 and
    every engine share one node and no GPU is involved (one copy into shared memory that every
    engine reads without a copy: measured the faster path on one machine, docs/benchmarks.md);
    broadcast otherwise (across nodes the object store moves one copy per engine's node through
    Ray's object transfer; with GPUs NCCL sends from device memory, no host round trip)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"weight_sync.transport {transport!r}: one of {', '.join(TRANSPORTS)}")
    if transport != "auto":
        return transport, "configured"
    others = sorted({n for n in engine_nodes if n != learner_node})
    if others:
        return "broadcast", f"engines on {len(others)} other node(s) than the learner's rank 0"
    if gpus:
        return "broadcast", "GPUs: NCCL from device memory"
    return "object_store", "learner and engines on one node, CPU"
