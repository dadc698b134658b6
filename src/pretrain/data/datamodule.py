"""The LightningDataModule: builds token shards when missing and streams blocks of tokens."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.item_loader import TokensLoader

from pretrain.data.block_loader import BlockLoader
from pretrain.data.block_order import BlockStream
from pretrain.data.block_reader import BlockReader
from pretrain.data.identity import build_identity, stream_identity
from pretrain.data.loader_workers import leave_stopping_to_the_trainer
from pretrain.data.prepare.build import build
from pretrain.data.prepare.manifest import SPLITS, read_manifest
from pretrain.data.prepare.mixture import check_mixture, single_corpus
from pretrain.data.prepare.options import CHUNK_BYTES, TOKENIZER_SAMPLE_BYTES, BuildOptions
from pretrain.data.prepare.ranks import Ranks
from pretrain.data.prepare.tokenizer import document_bounds, load_tokenizer, token_byte_lengths
from pretrain.data.prepare.tokenizer_files import read_companions
from pretrain.data.prepare.verify import verify_tokenizer_files
from pretrain.data.remote import (
    default_cache_dir,
    fetch_build_files,
    fetch_splits,
    fetch_tokenizer_files,
    is_remote,
)
from pretrain.data.shards import verify_split
from pretrain.data.skipping_loader import SkippingLoader
from pretrain.errors import UserError

log = logging.getLogger(__name__)


class PretrainData(L.LightningDataModule):
    """Serves blocks of ``seq_len + 1`` tokens: inputs are ``[:-1]``, targets ``[1:]``. Training draws them from
    the whole build in a seeded order (``block_order``); held-out splits are read in order.

    Args:
        sources: Files, directories or globs (.txt, .md, .jsonl, .jsonl.gz, .parquet), or ``stdlib``.
        mixture: Instead of ``sources``, named datasets sampled by weight:
            ``{name: {sources: [...], weight: w}}``; each is prepared into ``data_dir/<name>``.
        data_dir: Where tokenizer, shards and manifest are built and read. A bucket URL (``s3://...``,
            ``gs://``, ``azure://``, ``r2://``, ``hf://``) serves a build made elsewhere and uploaded.
        cache_dir: Local folder a remote ``data_dir``'s build is copied into, chunks checked against their
            digests (default ``data/remote-cache/<url>``).
        seq_len: Tokens the model sees per sequence.
        batch_size: Sequences per micro-batch on each device.
        num_workers: Training DataLoader processes per device (tokenizing uses every core); held-out
            splits are read in the training process.
        vocab_size: Size of the tokenizer trained when ``tokenizer`` is not given.
        tokenizer: A ``tokenizer.json``, or a model folder holding one (a Hugging Face model's, to continue
            pretraining it), to use instead of training one: documents end with its end-of-text token.
        val_fraction: Share of documents held out for validation.
        text_field: The JSONL field / Parquet column holding each document's text.
        seed: Seed of the training stream's order (each pass over the build has its own).
        overwrite: Rebuild ``data_dir`` even if it was built from other sources or another tokenizer,
            or its source files changed since.
        chunk_bytes: Size of each shard file (litdata's units: ``16MB``, ``512KB``). Training draws blocks from
            every chunk at every step, whatever their size.
        tokenizer_sample_bytes: About how much training text the tokenizer is trained on, sampled over
            every source (seeded); the rest of the corpus is only encoded.
        skip_batches: Training micro-batches each process draws and discards before training goes on: after
            ``--ckpt_path``, from the restored position. A run stopped by loss spikes prints the number that
            rolls back past their batches; 0 (the default) leaves resuming exact. Applied once: resuming a
            checkpoint of the run that skipped them, with the same number, skips nothing.
        allow_new_build: Resume a checkpoint on data other than what it was trained on (another build or
            tokenizer, another seq_len or seed): the training stream then starts from its beginning. Without
            it such a resume is refused, naming the change.
        eos_token: The token of the given ``tokenizer`` that ends each document, where it has none of
            ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>`` (tried in that order otherwise).
        bos_token: The token of the given ``tokenizer`` put before each document, as the model was first
            pretrained (Llama 3's ``<|begin_of_text|>``); none by default.
    """

    def __init__(
        self,
        sources: list[str] | None = None,
        mixture: dict[str, dict[str, Any]] | None = None,
        data_dir: str = "data/stdlib",
        seq_len: int = 256,
        batch_size: int = 8,
        num_workers: int = 1,
        vocab_size: int = 4096,
        tokenizer: str | None = None,
        val_fraction: float = 0.02,
        text_field: str = "text",
        seed: int = 42,
        overwrite: bool = False,
        cache_dir: str | None = None,
        chunk_bytes: str = CHUNK_BYTES,
        tokenizer_sample_bytes: int | str = TOKENIZER_SAMPLE_BYTES,
        skip_batches: int = 0,
        allow_new_build: bool = False,
        eos_token: str | None = None,
        bos_token: str | None = None,
    ) -> None:
        super().__init__()
        if mixture is not None and sources is not None:
            raise UserError("Give either data.sources or data.mixture, not both.")
        if skip_batches < 0:
            raise UserError(f"data.skip_batches={skip_batches} must be 0 or more (micro-batches to discard).")
        self.skip_batches = skip_batches
        self.allow_new_build = allow_new_build
        self._skip_now = skip_batches > 0  # until a checkpoint shows this run already skipped them
        self.train_loader: BlockLoader | None = None  # once made, to stop its workers at teardown
        # A single corpus is a mixture of one; bad names or weights fail here, before anything is built.
        sources = ["stdlib"] if sources is None else sources
        self.datasets = check_mixture(mixture) if mixture is not None else single_corpus(sources)
        self.data_dir = data_dir
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        # A given tokenizer fixes the vocabulary (the model reads it from here) and has the end-of-text token.
        given = load_tokenizer(tokenizer) if tokenizer else None
        if given is not None:
            document_bounds(given, eos_token, bos_token)  # refused before anything is built
        self.vocab_size = given.get_vocab_size() if given is not None else vocab_size
        self.build_options = BuildOptions(  # what the build depends on, kept once (progress and ranks: per call)
            vocab_size=self.vocab_size,
            tokenizer=tokenizer,
            val_fraction=val_fraction,
            text_field=text_field,
            overwrite=overwrite,
            chunk_bytes=chunk_bytes,
            tokenizer_sample_bytes=tokenizer_sample_bytes,
            eos_token=eos_token,
            bos_token=bos_token,
        )
        self.remote = is_remote(data_dir)
        self.cache_dir = Path(cache_dir or default_cache_dir(data_dir)) if self.remote else None
        # Where this process reads the manifest and tokenizer: the build itself, or the local cache of a remote one.
        self.build_dir = self.cache_dir if self.remote else Path(data_dir)
        if self.build_dir.exists() and not self.build_dir.is_dir():
            raise UserError(f"data.data_dir {self.build_dir} is a file, not a folder: point it at a folder.")
        self.tokenizer_path = self.build_dir / "tokenizer.json"  # written by prepare_data
        self.manifest: dict[str, Any] | None = None  # the build's, read in setup
        self.shares: dict[str, float] = {"": 1.0}  # the share of training samples of each dataset ("": the corpus)
        self.val_sets: dict[str, StreamingDataset] = {}  # one held-out set per dataset ("" for a single corpus)

    def prepare_data(self) -> None:
        """Runs on one process per node, before any other: build the shards if they are missing."""
        self.build()

    def build(self, progress: bool = False, ranks: Ranks | None = None) -> dict:
        """Build tokenizer and shards unless an identical build exists; returns the manifest.

        ``ranks``: the processes of a torchrun group sharing the work (``pretrain prepare``); default this
        one alone. A remote ``data_dir`` is never built, only read: its manifest and tokenizer are fetched.
        """
        if self.remote:
            fetch_build_files(self.data_dir, self.cache_dir)
            manifest = read_manifest(self.cache_dir)
            fetch_tokenizer_files(self.data_dir, self.cache_dir, manifest["tokenizer"].get("files", {}))
            splits = [f"{name}/{split}".lstrip("/") for name in manifest.get("mixture", [""]) for split in SPLITS]
            fetch_splits(self.data_dir, self._chunks_dir(manifest), splits, manifest.get("chunks"))
            return manifest
        options = replace(self.build_options, progress=progress, ranks=ranks or Ranks())
        return build(self.datasets, self.data_dir, options)

    def setup(self, stage: str) -> None:
        # Here, after the process group exists: each rank reads its own part of the held-out data.
        manifest = read_manifest(self.build_dir)
        if manifest is None:
            raise UserError(
                f"{self.data_dir} holds no complete build (manifest.json is missing); "
                "run `pretrain prepare` or `pretrain fit` to build it."
            )
        if manifest["tokenizer"]["vocab_size"] > self.vocab_size:
            raise UserError(
                f"{self.data_dir} was tokenized with {manifest['tokenizer']['vocab_size']} tokens, "
                f"more than the model's vocab_size {self.vocab_size}; set data.vocab_size to match."
            )
        built_mixture, mixture = sorted(manifest.get("mixture", {})), sorted(name for name in self.datasets if name)
        if built_mixture != mixture:
            raise UserError(
                f"{self.data_dir} holds {f'the mixture {built_mixture}' if built_mixture else 'a single corpus'}, "
                f"but data.mixture is {mixture or 'not set'}; "
                "make the config match the build, or point data.data_dir at another one."
            )
        verify_tokenizer_files(self.build_dir, manifest)
        self.shares = {name: dataset["share"] for name, dataset in self.datasets.items()}
        self.manifest = manifest
        for name in self.shares:
            for split in SPLITS:
                verify_split(self._split_dir(manifest, name, split))
        # Validation reads every dataset whole, each through its own loader: a loss per dataset and in all.
        self.val_sets = {name: self._held_out(self._split_dir(manifest, name, "val")) for name in self.shares}

    @property
    def held_out_names(self) -> list[str]:
        """The datasets validation reports on one by one (a mixture's names; none for a single corpus)."""
        return [name for name in self.val_sets if name]

    @property
    def eos_id(self) -> int:
        """The token that ends each document in the build (its manifest's: named, or found by its usual names)."""
        if self.manifest is None:
            raise RuntimeError("The data module is not set up yet: its build's manifest is read in setup().")
        return self.manifest["tokenizer"]["eos_id"]

    @property
    def bos_id(self) -> int | None:
        """The token the build put before each document (``data.bos_token``), if any."""
        if self.manifest is None:
            raise RuntimeError("The data module is not set up yet: its build's manifest is read in setup().")
        return self.manifest["tokenizer"].get("bos_id")

    def tokenizer_companions(self) -> dict[str, bytes]:
        """The files a given tokenizer came with (``tokenizer_files/``), by name; none for a trained one."""
        return read_companions(self.build_dir, list(self.manifest["tokenizer"].get("files", {})))

    def token_byte_table(self) -> tuple[list[int], int]:
        """Bytes of text per token id and the end-of-text id, of the build's tokenizer (for bits per byte); a
        token put before each document stands for no text."""
        lengths = token_byte_lengths(load_tokenizer(self.tokenizer_path))
        if self.bos_id is not None:
            lengths[self.bos_id] = 0
        return lengths, self.eos_id

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the tokenizer, its companion files and its end-of-text id, so generation and
        export need nothing but the checkpoint; and ``skip_batches``, so that resuming a run that skipped them
        does not skip them again."""
        eos, tokenizer = self.eos_id, self.tokenizer_path.read_text()  # the first fails before setup
        companions = self.tokenizer_companions()
        return {
            "tokenizer_json": tokenizer,
            "tokenizer_files": companions,
            "eos_id": eos,
            "bos_id": self.bos_id,
            "skipped_batches": self.skip_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restored before the loaders are made: a checkpoint of a run started with this same ``skip_batches``
        already stands past them (data.skip_batches applies to the resume it was given for)."""
        if self.skip_batches and state.get("skipped_batches") == self.skip_batches:
            log.info("data.skip_batches=%d: already skipped by the run this checkpoint comes from.", self.skip_batches)
            self._skip_now = False

    def _chunks_dir(self, manifest: dict[str, Any]) -> Path:
        """Where this process reads the chunks: the build itself, or the copy of a remote one under its identity."""
        return self.cache_dir / build_identity(manifest) if self.remote else Path(self.data_dir)

    def _split_dir(self, manifest: dict[str, Any], name: str, split: str) -> Path:
        return self._chunks_dir(manifest) / name / split  # a single corpus's name is "": the build's own folder

    def _held_out(self, split_dir: Path) -> StreamingDataset:
        """Held-out blocks in stored order, every one of them (drop_last only drops a partial batch)."""
        return StreamingDataset(
            str(split_dir), item_loader=TokensLoader(block_size=self.seq_len + 1), shuffle=False, drop_last=True
        )

    def _loader(self, dataset: StreamingDataset) -> StreamingDataLoader:
        return StreamingDataLoader(
            dataset, batch_size=self.batch_size, num_workers=0, pin_memory=torch.cuda.is_available(), drop_last=True
        )

    def train_dataloader(self) -> BlockLoader | SkippingLoader:
        """This process's part of the global block stream (``block_loader``), over every dataset of the build."""
        manifest = self.manifest
        reader = BlockReader([self._split_dir(manifest, name, "train") for name in self.shares], self.seq_len + 1)
        stream = BlockStream(reader.sizes, list(self.shares.values()), self.seed)
        rank, processes = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.train_loader = BlockLoader(
            reader,
            stream,
            self.batch_size,
            rank,
            processes,
            identity=stream_identity(manifest, self.seq_len, self.seed, [name for name in self.shares if name]),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=leave_stopping_to_the_trainer,
            allow_new_stream=self.allow_new_build,
        )
        return SkippingLoader(self.train_loader, self.skip_batches) if self._skip_now else self.train_loader

    def teardown(self, stage: str) -> None:
        """Lightning stops at the step count and never finishes the training loader's iterator: its workers are
        stopped here, or a process that trains again (a notebook, a sweep) keeps them."""
        if self.train_loader is not None:
            self.train_loader.close()

    def val_dataloader(self) -> StreamingDataLoader | list[StreamingDataLoader]:
        """Read in this process: held-out blocks are read in order, in a few ms, while a worker forked at each
        validation makes every page this process writes fault once while it lives (docs/design.md)."""
        loaders = [self._loader(dataset) for dataset in self.val_sets.values()]
        return loaders if len(loaders) > 1 else loaders[0]

    def test_dataloader(self) -> StreamingDataLoader | list[StreamingDataLoader]:
        """``pretrain test`` reports on the held-out split too."""
        return self.val_dataloader()
