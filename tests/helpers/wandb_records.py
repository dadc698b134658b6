"""What an offline Weights & Biases run wrote, read back from its ``run-ID.wandb`` file (the records ``wandb sync``
would upload), for tests: the logged keys, the config."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024  # the file is a LevelDB-style log: 32 KiB blocks of records with 7-byte headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    position, records, pending = 7, [], b""  # after the file's own 7-byte header (":W&B", magic, version)
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
        else:
            break
    return records


def offline_run(save_dir: Path) -> tuple[set[str], dict[str, Any]]:
    """(every key logged to the history, the run's config) of the one offline run under ``save_dir``."""
    from wandb.proto import wandb_internal_pb2

    (path,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
    keys, config = set(), {}
    for raw in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
    return keys, config
