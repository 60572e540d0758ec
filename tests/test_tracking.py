"""`tracking: [tensorboard, wandb]`: the real TensorBoard writer and W&B (offline) given a short
run's metrics — every catalog key for three steps — read back from their files with TensorBoard's
event reader and by decoding W&B's run file; a tracker that fails is dropped with a warning."""

from __future__ import annotations

import json
import logging
import struct

import pytest

from services.metrics_export import METRIC_CATALOG
from services.tracking import _KINDS, Tracking, flat_hparams

SPEC = {"name": "t", "data": {"dataset": "reasoning_gym:chain_sum", "size": 8}, "algorithm": {"lr": 1e-4},
        "tracking": ["tensorboard", "wandb"]}


def _keys() -> list[str]:
    keys = []
    for d in METRIC_CATALOG:
        heads = range(d.heads_from, 3) if d.per_head else [None]
        keys += [d.key.replace("{h}", str(h)) if h is not None else d.key for h in heads]
    return keys


def _wandb_records(path):
    """Records of a W&B run file (LevelDB log framing: 32 KiB blocks, 7-byte chunk headers, after a
    7-byte ':W&B' file header; payloads are `wandb_internal_pb2.Record`s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST continue it
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def test_tensorboard_and_wandb_hold_every_metric_hparams_and_report_plots(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    keys = _keys()
    rows = [{"step": s, **{k: 0.1 * s + i for i, k in enumerate(keys)}} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # the report's input
    tracking = Tracking(SPEC["tracking"], tmp_path, "run/1", SPEC)
    assert set(tracking.trackers) == {"tensorboard", "wandb"}
    for r in rows:
        tracking.log(r, r["step"])
    tracking.finish()

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert set(keys) <= set(acc.Tags()["scalars"]), set(keys) - set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars(keys[3])] == pytest.approx([0.1 * s + 3 for s in (1, 2, 3)])
    pngs = sorted(p.stem for p in (tmp_path / "report").glob("*.png"))
    assert pngs and sorted(acc.Tags()["images"]) == [f"report/{p}" for p in pngs]
    assert "run_spec/text_summary" in acc.Tags()["tensors"]  # the spec as text (hparams: their own plugin)

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    metric_rows = [h for h in history if "loss/total" in h]
    assert [h["_step"] for h in metric_rows] == [1, 2, 3]
    assert all(set(keys) <= h.keys() for h in metric_rows)
    assert any(k.startswith("report/") for h in history for k in h)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    assert config["data"] == SPEC["data"] and config["algorithm"] == SPEC["algorithm"], config


def test_a_failing_tracker_warns_and_the_others_go_on(tmp_path, monkeypatch, caplog):
    class Broken:
        def __init__(self, *a):
            pass

        def log(self, metrics, step):
            raise OSError("disk full")

    monkeypatch.setitem(_KINDS, "wandb", Broken)
    monkeypatch.setitem(_KINDS, "nope", lambda *a: 1 / 0)
    tracking = Tracking(["tensorboard", "wandb", "nope"], tmp_path, "r", SPEC)
    with caplog.at_level(logging.WARNING, logger="services.tracking"):
        tracking.log({"loss/total": 1.0, "bad": float("nan")}, 1)
        tracking.log({"loss/total": 2.0}, 2)
    tracking.finish(with_report=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss/total")] == [1.0, 2.0] and "bad" not in acc.Tags()["scalars"]
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("wandb failed in log" in w and "disk full" in w for w in warnings) == 1  # once, then dropped
    assert flat_hparams({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": "null"}
