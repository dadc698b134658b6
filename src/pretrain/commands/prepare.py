"""``pretrain prepare --config configs/X.yaml [--data.key value ...]``: raw text to tokenizer and token shards,
alone (e.g. on CPU nodes before training), with a progress bar and a closing summary; ``--verify`` checks a
finished build instead. Also ``python -m pretrain.commands.prepare``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pretrain.data.prepare.ranks import Ranks
from pretrain.errors import UserError, run_command


def summary(manifest: dict) -> str:
    """The closing lines of a standalone preparation."""
    splits = manifest["splits"]
    documents = sum(split["documents"] for split in splits.values())
    tokens = sum(split["tokens"] for split in splits.values())
    seconds, layout = manifest["seconds"], manifest.get("layout", {})
    return "\n".join(
        [
            f"documents  {documents:,} (train {splits['train']['documents']:,}, val {splits['val']['documents']:,};"
            f" duplicates dropped {manifest['duplicate_documents']:,}; pieces of cut files {manifest['pieces']:,})",
            f"tokens     {tokens:,} (train {splits['train']['tokens']:,}, val {splits['val']['tokens']:,} ="
            f" {100 * splits['val']['share']:.2f}%)",
            f"bytes      {manifest['source_bytes']:,} of source files",
            f"skipped    files {manifest['skipped_files']}, records {manifest['skipped_records']}, "
            f"invalid UTF-8 documents {manifest['invalid_utf8_documents']}",
            f"seconds    {seconds} ({tokens / seconds:,.0f} tokens/s, tokenizer training included)"
            + (f" by {layout['processes']} process(es)" if layout else ""),
            f"peak RSS   {', '.join(f'{mb:,.0f}' for mb in manifest['peak_rss_mb'])} MB per process",
        ]
    )


def share_the_cores() -> None:
    """Under torchrun, the processes of one node share its cores: each tokenizer gets its part (HF tokenizers
    would otherwise start one thread per core in every process)."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_processes > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local_processes)))


def verify(data_dir: str) -> None:
    """``--verify``: the build re-read whole, nothing built; a damage is named in one ``error:`` line."""
    from pretrain.data.prepare.verify import verify_build
    from pretrain.data.remote import is_remote

    if is_remote(data_dir):
        raise UserError(f"--verify reads a local build, and {data_dir} is in a bucket: verify the folder uploaded.")
    manifest = verify_build(Path(data_dir))
    print(f"{data_dir}: {len(manifest['chunks'])} chunks match their checksums; every token id is in the vocabulary.")


def main(argv: list[str] | None = None) -> None:
    """``pretrain prepare --config configs/X.yaml [--data.key value ...] [--verify]``: the shards alone, or
    (``--verify``) a check of the finished build.

    Under ``torchrun --nnodes N --nproc-per-node P``, every process takes a share of the work.
    """
    from pretrain.commands.cli import data_cli  # the training command line's parser (imports Lightning)

    share_the_cores()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cli = data_cli(argv)
    data = cli.datamodule
    if cli.config.verify:
        verify(data.data_dir)
        return
    with Ranks.from_launcher() as ranks:
        manifest = data.build(progress=True, ranks=ranks)
        if ranks.first:
            print(f"\n{data.data_dir}\n{summary(manifest)}")


if __name__ == "__main__":
    run_command(main)
