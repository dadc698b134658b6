"""What a run's data stream is: the build's identity and the settings that give a stream position its meaning.

A checkpoint records them beside its position in the stream; a resume that finds them changed (a rebuilt or
re-uploaded build, another tokenizer, another block length or seed) would train on other tokens under the same
position, or on other ids for the same text, without a word. It is refused instead, naming the change.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def build_identity(manifest: dict[str, Any]) -> str:
    """A digest of what a build holds: its chunks' digests where the manifest lists them, else what it was built
    from and its counts; the tokenizer's digest in both. The same build moved or copied keeps its identity."""
    content = manifest.get("chunks") or {"request": manifest["request"], "splits": manifest["splits"]}
    text = json.dumps({"tokenizer": manifest["tokenizer"]["sha256"], "content": content}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stream_identity(manifest: dict[str, Any], seq_len: int, seed: int, datasets: list[str]) -> dict[str, Any]:
    """What a position in the training stream depends on."""
    return {
        "build": build_identity(manifest),
        "tokenizer": manifest["tokenizer"]["sha256"][:16],
        "block_len": seq_len + 1,
        "seed": seed,
        "datasets": list(datasets),
    }


def stream_change(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first difference between a checkpoint's stream and this run's, in words; None when they are the same."""
    if "build" not in saved:
        return "The checkpoint's data position comes from another data loader (no build identity)"
    if saved["tokenizer"] != now["tokenizer"]:
        return (
            f"The checkpoint was trained on the ids of tokenizer {saved['tokenizer']}, but data.data_dir holds a "
            f"build of tokenizer {now['tokenizer']}: the same ids stand for other text"
        )
    if saved["datasets"] != now["datasets"]:
        return f"The checkpoint was trained on the datasets {saved['datasets']}, this run reads {now['datasets']}"
    if saved["build"] != now["build"]:
        return (
            f"The checkpoint's data position is in build {saved['build']}, but data.data_dir holds build "
            f"{now['build']} (rebuilt or changed since)"
        )
    if saved["block_len"] != now["block_len"]:
        return (
            f"The checkpoint's data position counts blocks of data.seq_len + 1 = {saved['block_len']} tokens, "
            f"this run reads blocks of {now['block_len']}: set data.seq_len: {saved['block_len'] - 1}"
        )
    if saved["seed"] != now["seed"]:
        return f"The checkpoint's data order was drawn with data.seed {saved['seed']}, this run's with {now['seed']}"
    return None
