"""Read back an offline wandb run (``<save_dir>/wandb/offline-run-*/``) without a server.

wandb >= 0.19 keeps config, summary and history only in the run's ``run-<id>.wandb`` transaction log (``files/``
holds the media, ``output.log`` and ``requirements.txt``).  That log is a LevelDB-style record log: a 7-byte header
(``:W&B``, magic 0xBEE1 little-endian, version 0), then 32 KiB blocks of chunks ``crc32c (4) | length (2, LE) |
type (1: full, 2: first, 3: middle, 4: last) | data``; each whole record is a ``wandb_internal_pb2.Record``
(the SDK's own protobuf).  This is what ``wandb sync`` uploads.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER = b":W&B" + struct.pack("<H", 0xBEE1) + b"\x00"
BLOCK = 32 * 1024
CHUNK_HEADER = 7


def read_records(path: str | Path) -> list:
    """Every record (``wandb_internal_pb2.Record``) of a ``run-*.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path} is not a wandb transaction log (header {data[:7]!r})")
    records, pos, pending = [], len(HEADER), b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer: padding
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:  # zero padding
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def _items(items) -> dict:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


def offline_run(run_dir: str | Path) -> dict:
    """``{"config": {...}, "summary": {...}, "history": [{...}, ...], "run": RunRecord}`` of an offline run dir."""
    [log] = sorted(Path(run_dir).glob("run-*.wandb"))
    out: dict = {"config": {}, "summary": {}, "history": [], "run": None}
    for rec in read_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update(_items(rec.run.config.update))
        elif kind == "config":
            out["config"].update(_items(rec.config.update))
        elif kind == "summary":
            out["summary"].update(_items(rec.summary.update))
        elif kind == "history":
            out["history"].append(_items(rec.history.item))
    return out
