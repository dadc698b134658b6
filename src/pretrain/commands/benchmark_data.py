"""Data-side speed: preparation against the tokenizer's own throughput, and the training loader; or whole
preparations of a large corpus by several processes.

``pretrain benchmark data --config configs/quickstart.yaml``
``pretrain benchmark data --config configs/quickstart.yaml --data.sources "[/big/corpus]" --processes 1 2``
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from tokenizers import Tokenizer

from pretrain.commands.cli import data_module_from_args
from pretrain.data import PretrainData
from pretrain.data.prepare.build import prepare
from pretrain.data.prepare.encode import ENCODE_BATCH_CHARS
from pretrain.data.prepare.manifest import read_manifest
from pretrain.data.prepare.mixture import every_source
from pretrain.data.prepare.plan import plan_units
from pretrain.data.prepare.readers import read_unit
from pretrain.data.prepare.sources import resolve_sources
from pretrain.errors import UserError


def tokenizer_speed(data: PretrainData) -> tuple[float, int]:
    """Tokens/s of HF tokenizers' ``encode_batch_fast`` alone over every document, in the batches preparation
    uses, on all cores: the practical limit. Only the encoding is timed, not the reading."""
    tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
    tokenizer.encode_special_tokens = True
    options = data.build_options
    files = resolve_sources(every_source(data.datasets), options.text_field).files
    seconds, tokens, batch, batch_chars = 0.0, 0, [], 0

    def encode() -> None:
        nonlocal seconds, tokens, batch_chars
        start = time.perf_counter()
        encodings = tokenizer.encode_batch_fast(batch, add_special_tokens=False)
        seconds += time.perf_counter() - start
        tokens += sum(len(encoding.ids) + 1 for encoding in encodings)  # + 1: the end-of-text each document gets
        batch.clear()
        batch_chars = 0

    for unit in plan_units(files, options.val_fraction):
        for document in read_unit(unit, options.text_field):
            if document.text:
                batch.append(document.text)
                batch_chars += len(document.text)
                if batch_chars >= ENCODE_BATCH_CHARS:
                    encode()
    encode()
    return tokens / seconds, tokens


def preparation_speed(data: PretrainData) -> float:
    """Tokens/s of building the shards from the raw sources with the (already trained) tokenizer."""
    with tempfile.TemporaryDirectory(prefix="benchmark-data-") as scratch:
        start = time.perf_counter()
        manifest = prepare(
            every_source(data.datasets),
            scratch,
            tokenizer=str(data.tokenizer_path),
            val_fraction=data.build_options.val_fraction,
            text_field=data.build_options.text_field,
        )
        seconds = time.perf_counter() - start
    return sum(split["tokens"] for split in manifest["splits"].values()) / seconds


def loader_speed(data: PretrainData, batch_size: int, seq_len: int, batches: int) -> float:
    """Tokens/s the training DataLoader delivers at ``batch_size`` x (``seq_len`` + 1)."""
    loader_data = PretrainData(
        data_dir=data.data_dir,
        seq_len=seq_len,
        batch_size=batch_size,
        num_workers=data.num_workers,
        vocab_size=data.vocab_size,
    )
    loader_data.setup("fit")
    loader, seen, start = loader_data.train_dataloader(), 0, time.perf_counter()
    if len(loader) == 0:
        raise UserError(f"{data.data_dir} holds too few tokens for one batch of {batch_size} x {seq_len + 1}.")
    while seen < batches:
        for _ in loader:
            seen += 1
            if seen == batches:
                break
    return batches * batch_size * (seq_len + 1) / (time.perf_counter() - start)


def data(argv: list[str], batch_size: int = 32, seq_len: int = 1024, batches: int = 300) -> dict:
    source = data_module_from_args(argv)
    source.build()  # tokenizer and shards in place, so only the measured work is timed below
    tokenizer_tps, tokens = tokenizer_speed(source)
    prepare_tps = preparation_speed(source)
    loader_tps = loader_speed(source, batch_size, seq_len, batches)
    result = {
        "data_dir": source.data_dir,
        "tokens": tokens,
        "prepare_tokens_per_sec": round(prepare_tps),
        "tokenizer_tokens_per_sec": round(tokenizer_tps),
        "prepare_ratio": round(prepare_tps / tokenizer_tps, 3),
        "loader_tokens_per_sec": round(loader_tps),
    }
    print(f"\n{source.data_dir}: {tokens:,} tokens")
    print(f"  preparation      {prepare_tps:>14,.0f} tokens/s")
    print(f"  encode_batch     {tokenizer_tps:>14,.0f} tokens/s   (ratio {result['prepare_ratio']})")
    print(f"  loader {batch_size}x{seq_len + 1} {loader_tps:>14,.0f} tokens/s")
    return result


def preparation_by_processes(argv: list[str], counts: list[int]) -> dict:
    """Whole preparations (tokenizer training included) of the config's sources, by each number of processes
    under torchrun, into a scratch folder: seconds, tokens/s and every process's peak memory."""
    results = []
    for processes in counts:
        with tempfile.TemporaryDirectory(prefix="benchmark-prepare-") as scratch:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(processes),
                "-m",
                "pretrain.commands.prepare",
                *argv,
                f"--data.data_dir={scratch}/data",
            ]
            started = time.perf_counter()
            finished = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            wall = time.perf_counter() - started
            if finished.returncode != 0:
                raise UserError(f"Preparation by {processes} process(es) failed:\n{finished.stderr[-3000:]}")
            manifest = read_manifest(f"{scratch}/data")
        tokens = sum(split["tokens"] for split in manifest["splits"].values())
        results.append(
            {
                "processes": processes,
                "seconds": round(wall, 1),
                "tokens": tokens,
                "source_bytes": manifest["source_bytes"],
                "tokens_per_sec": round(tokens / wall),
                "peak_rss_mb": manifest["peak_rss_mb"],
            }
        )
    print(f"\n{results[0]['source_bytes']:,} bytes of sources, {results[0]['tokens']:,} tokens")
    print("processes  seconds  tokens/s    peak RSS per process (MB)")
    for row in results:
        print(f"{row['processes']:>9}  {row['seconds']:>7}  {row['tokens_per_sec']:>10,}  {row['peak_rss_mb']}")
    return {"preparations": results}
