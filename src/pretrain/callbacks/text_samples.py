"""Callbacks that show what the model learns while it trains."""

from __future__ import annotations

import html
import re
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tokenizers import Tokenizer
from torch.distributed.fsdp import FullyShardedDataParallel

from pretrain.callbacks.trackers import write_tables
from pretrain.commands.generate import continuation_text, generate_each, prompt_ids
from pretrain.data.prepare.tokenizer import DocumentBounds
from pretrain.data.shards import iter_documents


class TextSamples(L.Callback):
    """After each validation, what the model writes, in TensorBoard's TEXT tab as two Markdown tables: each
    prompt continued greedily and by sampling (``temperature``, ``top_k``; seeded, so a rerun writes the same
    text), and the start of a few held-out documents with the model's greedy continuation beside the real one.

    Every rank generates (sharded models need all ranks in each forward); rank 0 logs. With a KV
    cache, the continuations of prompts of one length decoded together, and a few dozen tokens, this costs a
    fraction of one validation.

    Args:
        prompts: Texts to continue; an empty string starts a new document.
        max_new_tokens: Tokens generated per continuation.
        temperature: Of the sampled continuation (the greedy one takes the likeliest token every time).
        top_k: The sampled continuation draws among the ``top_k`` likeliest tokens (null: all).
        seed: Of the sampling, the same at every validation.
        held_out: How many held-out documents to continue (the first of the validation split).
        held_out_prompt_tokens: How much of each held-out document the model is shown.
    """

    def __init__(
        self,
        prompts: list[str],
        max_new_tokens: int = 48,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
        held_out: int = 3,
        held_out_prompt_tokens: int = 32,
    ) -> None:
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.held_out, self.held_out_prompt_tokens = held_out, held_out_prompt_tokens
        self.tokenizer: Tokenizer | None = None
        self.bounds = DocumentBounds(-1)  # the build's tokens around each document, read in setup
        self.documents: list[tuple[list[int], list[int]]] = []  # (shown, what follows) of each held-out document

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After prepare_data, so the tokenizer file exists; read once, not at every validation.
        self.tokenizer = Tokenizer.from_file(str(trainer.datamodule.tokenizer_path))
        datamodule = trainer.datamodule
        self.bounds = DocumentBounds(datamodule.eos_id, getattr(datamodule, "bos_id", None))
        room = min(self.held_out_prompt_tokens, pl_module.config.seq_len - self.max_new_tokens)
        documents = held_out_starts(trainer.datamodule, self.held_out, room, self.max_new_tokens)
        # Rank 0's: nodes may hold different parts of a streamed split, and every rank must generate alike.
        self.documents = trainer.strategy.broadcast(documents, src=0)

    def samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, list[tuple[str, ...]]]:
        """Rows of both tables, on every rank: (prompt, greedy, sampled) and (shown, the model's, the real)."""
        model, tokenizer, eos = pl_module.model, self.tokenizer, self.bounds.eos
        requests = []  # (prompt ids, temperature, tokens): each prompt greedy and sampled, then the documents
        for prompt in self.prompts:
            ids = prompt_ids(tokenizer, prompt, self.bounds)
            requests += [(ids, 0.0, self.max_new_tokens), (ids, self.temperature, self.max_new_tokens)]
        requests += [(shown, 0.0, len(real)) for shown, real in self.documents]
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), gathered_weights(trainer.strategy.model):
            # New shapes at each token: run eagerly rather than recompile.
            generator = torch.Generator(model.embed.weight.device).manual_seed(self.seed)
            written = generate_each(model, requests, self.top_k, eos, generator, tokenizer.get_vocab_size())
        texts = [continuation_text(tokenizer, ids, eos) for ids in written[: 2 * len(self.prompts)]]
        prompts = list(zip(self.prompts, texts[0::2], texts[1::2], strict=True))  # greedy, then sampled
        documents = [
            (decode(tokenizer, shown), decode(tokenizer, ids), decode(tokenizer, real))
            for (shown, real), ids in zip(self.documents, written[len(texts) :], strict=True)
        ]
        return {"prompts": prompts, "documents": documents}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        samples = self.samples(trainer, pl_module)
        if trainer.is_global_zero:
            sampled = f"sampled (temperature {self.temperature}, top-k {self.top_k or 'all'})"
            tables = {"prompts": (("prompt", "greedy", sampled), samples["prompts"])}
            if samples["documents"]:
                header = ("a held-out document begins", "the model goes on", "the document goes on")
                tables["documents"] = (header, samples["documents"])
            text = "\n\n".join(markdown_table(*table) for table in tables.values())
            for logger in trainer.loggers:
                write_tables(logger, "samples", tables, text, trainer.global_step)


def held_out_starts(datamodule: Any, count: int, shown: int, follows: int) -> list[tuple[list[int], list[int]]]:
    """The first ``shown`` tokens of the first ``count`` validation documents long enough, and up to ``follows``
    tokens after them; none where the split is not on this machine (a remote build streams it)."""
    build = Path(datamodule.build_dir)
    splits = [build / "val", *(build / name / "val" for name in getattr(datamodule, "held_out_names", []))]
    starts = []
    for split in splits:
        if not (split / "index.json").is_file() or shown < 1:
            continue
        try:
            for document in iter_documents(split):
                ids = document[:-1].tolist()  # the end-of-text token left out
                if len(ids) > shown + 8:
                    starts.append((ids[:shown], ids[shown : shown + follows]))
                if len(starts) == count:
                    return starts
        except OSError:  # a chunk not fetched into a remote build's cache
            continue
    return starts


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|])")


SPACES = re.compile(r"^ +| {2,}| +$")  # what HTML would collapse or Markdown strip
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f]")  # shown as their Unicode pictures (U+2400...), not dropped


def markdown_cell(text: str) -> str:
    """``text`` in one table cell as written, in a fixed-width font: HTML and Markdown characters escaped, line
    breaks as ``<br>``, indentation and runs of spaces kept."""
    text = CONTROL.sub(lambda c: chr(0x2400 + ord(c.group())), text.replace("\r\n", "\n").replace("\r", "\n"))
    text = MARKDOWN_PUNCTUATION.sub(r"\\\1", html.escape(text, quote=False)).replace("\t", "    ")
    lines = [SPACES.sub(lambda spaces: "&nbsp;" * len(spaces.group()), line) for line in text.split("\n")]
    return f"<code>{'<br>'.join(lines) or '&nbsp;'}</code>"


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(markdown_cell, row)) + " |" for row in rows])


def gathered_weights(wrapped: torch.nn.Module) -> AbstractContextManager:
    """FSDP1 gathers a unit's weights only inside that unit's own forward, and the root unit (embedding,
    final norm, LM head) wraps the whole LightningModule: sampling, which calls the inner model token
    by token, gathers every weight for its duration instead (read-only; each rank briefly holds the
    full fp32 weights). FSDP2 gathers per call."""
    if isinstance(wrapped, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(wrapped, writeback=False)
    return nullcontext()
