"""Reading a Weights & Biases run's transaction log (`run-<id>.wandb`), for `signalrl doctor`
and for checking what the wandb sink recorded.

wandb 0.31 ships no Python reader for this file (the old `wandb.sdk.internal.datastore` is
gone; `wandb-core` reads it in Go), but the format is small: a 7-byte header (`:W&B`, magic
0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks (a 7-byte header per chunk:
CRC-32 of type + data, length, type FULL/FIRST/MIDDLE/LAST; a block tail under 7 bytes is
padding), each record a `wandb.proto.wandb_internal_pb2.Record` (the SDK's own protobuf).
Every chunk's CRC is checked, so a misread file is an error, not wrong numbers.

`read_wandb_run(path)` returns the history rows (`{"step": s, name: value}`, numbers only;
wandb's own `_step`, `_runtime`, `_timestamp` left out), the run config (`_wandb` left out)
and the final summary.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_wandb_file(path: Path) -> Path | None:
    """The `run-*.wandb` file of a W&B run directory (or `path` itself if it is one)."""
    if path.is_file():
        return path if path.suffix == ".wandb" else None
    files = sorted(path.glob("run-*.wandb")) if path.is_dir() else []
    return files[-1] if files else None


def read_records(path: Path) -> list[bytes]:
    """The serialized records of a `.wandb` file; a bad header or checksum is a ValueError
    naming the file and the offset (a torn last record, a run still writing, is dropped)."""
    data = path.read_bytes()
    if data[: len(HEADER)] != HEADER:
        raise ValueError(f"{path}: not a W&B transaction log (no ':W&B' header)")
    records: list[bytes] = []
    pos, parts = len(HEADER), b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's padded tail
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if kind == 0 and length == 0:  # zero padding (a preallocated tail)
            pos += 7
            continue
        if len(chunk) < length:
            break  # torn at the end
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum of the record chunk at byte {pos}")
        pos += 7 + length
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            records.append(parts)
            parts = b""
    return records


def wait_for_exit(run_dir: Path, timeout: float = 30.0, poll: float = 0.1) -> bool:
    """Wait until the `.wandb` log of `run_dir` ends with its `exit` record (wandb's service
    may still be writing it after `run.finish()` returns); False after `timeout` seconds."""
    import time

    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        f = find_wandb_file(run_dir)
        if f is not None:
            try:
                records = read_records(f)
            except (OSError, ValueError):
                records = []
            rec = pb.Record()
            if records and rec.ParseFromString(records[-1]) and rec.HasField("exit"):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def _key(item: Any) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def read_wandb_run(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(history rows, config, summary) of a W&B run directory or `.wandb` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    p = Path(path)
    f = find_wandb_file(p)
    if f is None:
        raise FileNotFoundError(f"{p}: no run-*.wandb file (not a W&B run directory)")
    rows: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for raw in read_records(f):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in rec.history.item}
            step = rec.history.step.num if rec.history.HasField("step") else row.get("_step")
            nums = {
                k: v
                for k, v in row.items()
                if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            rows.append({"step": int(step or 0), **nums})
        elif kind in ("run", "config"):
            updates = rec.run.config.update if kind == "run" else rec.config.update
            config.update({_key(u): json.loads(u.value_json) for u in updates})
        elif kind == "summary":
            summary.update({_key(u): json.loads(u.value_json) for u in rec.summary.update})
    config.pop("_wandb", None)
    return rows, config, summary
