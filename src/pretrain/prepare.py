"""``pretrain prepare --config configs/X.yaml [--data.key value ...]``: raw text to tokenizer and token shards,
alone (e.g. on CPU nodes before training), with a progress bar and a closing summary.
Also ``python -m pretrain.prepare``."""

from __future__ import annotations

import logging

from pretrain.errors import run_command


def summary(manifest: dict) -> str:
    """The closing lines of a standalone preparation."""
    splits = manifest["splits"]
    documents = sum(split["documents"] for split in splits.values())
    tokens = sum(split["tokens"] for split in splits.values())
    seconds = manifest["seconds"]
    return "\n".join(
        [
            f"documents  {documents:,} (train {splits['train']['documents']:,}, val {splits['val']['documents']:,})",
            f"tokens     {tokens:,} (train {splits['train']['tokens']:,}, val {splits['val']['tokens']:,})",
            f"bytes      {manifest['source_bytes']:,} of source files",
            f"skipped    files {manifest['skipped_files']}, records {manifest['skipped_records']}, "
            f"invalid UTF-8 documents {manifest['invalid_utf8_documents']}",
            f"seconds    {seconds} ({tokens / seconds:,.0f} tokens/s, tokenizer training included)",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """``pretrain prepare --config configs/X.yaml [--data.key value ...]``: the shards alone."""
    from pretrain.cli import data_module_from_args  # the training command line's parser (imports Lightning)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = data_module_from_args(argv)
    manifest = data.build(progress=True)
    print(f"\n{data.data_dir}\n{summary(manifest)}")


if __name__ == "__main__":
    run_command(main)
