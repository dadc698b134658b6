"""The training stream: blocks drawn from the whole build, the same on resume, whatever the processes."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from pretrain.data import PretrainData
from pretrain.data.block_loader import BlockLoader
from pretrain.data.block_order import BlockPermutation, BlockStream
from pretrain.data.prepare.build import prepare
from pretrain.errors import UserError
from tests.helpers.runs import TINY_VOCAB, assert_ok, tiny_fit_args

ALPHABETS = {"books": "abcdefgh", "code": "ijklmnop", "web": "qrstuvwx"}  # a block's letters tell its source


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 4099])
def test_a_permutation_visits_every_block_once(size: int) -> None:
    order = BlockPermutation(size, key=3)(np.arange(size))
    assert sorted(order.tolist()) == list(range(size))
    if size > 64:
        assert order.tolist() != list(range(size))
        assert order.tolist() != BlockPermutation(size, key=4)(np.arange(size)).tolist()


def test_the_stream_taken_in_any_steps_is_the_same_stream() -> None:
    stream = BlockStream([50, 30, 7], [0.5, 0.3, 0.2], seed=1)
    whole, _ = stream.take(stream.start(), 240)
    parts, state = [], stream.start()
    for count in (1, 16, 7, 100, 116):
        blocks, state = stream.take(state, count)
        parts.append(blocks)
    assert np.concatenate(parts).tolist() == whole.tolist()
    assert state.taken == [120, 72, 48]  # the shares, over passes of each dataset
    first_pass = whole[(whole >= 80)][:7]  # the third dataset's first seven samples: its whole first pass
    assert sorted(first_pass.tolist()) == list(range(80, 87))


def write_long_documents(root: Path, documents: int, words: int) -> None:
    """Three sources of long documents, each in its own folder and alphabet."""
    rng = random.Random(0)
    for name, alphabet in ALPHABETS.items():
        (root / name).mkdir(parents=True)
        for n in range(documents):
            text = " ".join("".join(rng.choices(alphabet, k=rng.randint(2, 7))) for _ in range(words))
            (root / name / f"{n:03d}.txt").write_text(text)


def source_of(text: str) -> str:
    return max(ALPHABETS, key=lambda name: sum(text.count(c) for c in ALPHABETS[name]))


@pytest.fixture(scope="module")
def long_documents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("long")
    write_long_documents(root / "corpus", documents=24, words=6000)  # about 10K tokens a document
    sources = [str(root / "corpus" / name) for name in ALPHABETS]  # in file order: books, then code, then web
    prepare(sources, str(root / "data"), vocab_size=TINY_VOCAB, val_fraction=0.05, chunk_bytes="256KB")
    return root / "data"


def largest_source_share(data_dir: Path, batches: int, batch_size: int, seed: int) -> list[float]:
    """Per training batch, the share of its blocks that come from the batch's most frequent source."""
    decode = Tokenizer.from_file(str(data_dir / "tokenizer.json")).decode
    data = PretrainData(
        data_dir=str(data_dir), seq_len=255, batch_size=batch_size, num_workers=0, vocab_size=TINY_VOCAB, seed=seed
    )
    data.setup("fit")
    shares = []
    for _, batch in zip(range(batches), data.train_dataloader(), strict=False):
        origins = [source_of(decode(block.tolist())) for block in batch]
        shares.append(max(origins.count(name) for name in ALPHABETS) / batch_size)
    return shares


def test_each_batch_draws_its_blocks_from_the_whole_corpus(long_documents: Path) -> None:
    """Independent draws of 8 blocks from three equal sources give a largest share of 0.52 on average; blocks
    from one stretch of one chunk give near 1."""
    manifest = json.loads((long_documents / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] / manifest["splits"]["train"]["documents"] > 5000
    for seed in (42, 7):
        shares = largest_source_share(long_documents, batches=24, batch_size=8, seed=seed)
        assert np.mean(shares) <= 0.60, (seed, shares)
        assert max(shares) < 1.0, (seed, shares)


def loader_of(data_dir: Path, **options) -> BlockLoader:
    data = PretrainData(
        data_dir=str(data_dir), batch_size=4, num_workers=0, **{"seq_len": 63, "vocab_size": TINY_VOCAB, **options}
    )
    data.setup("fit")
    return data.train_dataloader()


def saved_after(data_dir: Path, batches: int) -> dict:
    loader = loader_of(data_dir)
    for _, _batch in zip(range(batches), loader, strict=False):
        pass
    return loader.state_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seq_len": 31}, r"counts blocks of data.seq_len \+ 1 = 64 tokens, this run reads blocks of 32"),
        ({"seed": 1}, r"drawn with data.seed 42, this run's with 1"),
    ],
)
def test_a_resume_with_another_seq_len_or_seed_is_refused_in_one_line(
    prepared: Path, change: dict, message: str
) -> None:
    with pytest.raises(UserError, match=message + r".*--data.allow_new_build true"):
        loader_of(prepared, **change).load_state_dict(saved_after(prepared, 3))


def test_a_resume_on_a_rebuilt_or_retokenized_build_is_refused_unless_allowed(
    corpus, prepared: Path, tmp_path: Path
) -> None:
    saved = saved_after(prepared, 3)
    moved = tmp_path / "moved"
    shutil.copytree(prepared, moved)
    same = loader_of(moved)  # the same build elsewhere resumes where it stood
    same.load_state_dict(saved)
    assert same.state.position == 12
    rebuilt = tmp_path / "rebuilt"
    prepare([str(corpus[0])], str(rebuilt), tokenizer=str(prepared / "tokenizer.json"), val_fraction=0.2)
    with pytest.raises(UserError, match=r"data position is in build \w+, but data.data_dir holds build \w+"):
        loader_of(rebuilt).load_state_dict(saved)
    retokenized = tmp_path / "retokenized"
    prepare([str(corpus[0])], str(retokenized), vocab_size=TINY_VOCAB + 32, val_fraction=0.1)
    with pytest.raises(UserError, match=r"trained on the ids of tokenizer \w+, but .* tokenizer \w+"):
        loader_of(retokenized, vocab_size=TINY_VOCAB + 32).load_state_dict(saved)
    allowed = loader_of(rebuilt, allow_new_build=True)
    allowed.load_state_dict(saved)
    assert allowed.state.position == 0


def test_fit_resumed_with_another_seed_ends_in_one_error_line_and_allow_new_build_goes_on(
    corpus, prepared: Path, tmp_path: Path, run_cli
) -> None:
    first = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, "--trainer.max_steps", "3"))
    assert_ok(first)
    resume = ("--trainer.max_steps", "5", "--ckpt_path", "last", "--data.seed", "1")
    refused = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, *resume))
    assert refused.returncode == 2
    assert "error: The checkpoint's data order was drawn with data.seed 42, this run's with 1" in refused.stderr
    assert "Traceback" not in refused.stderr
    allowed = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, *resume, "--data.allow_new_build", "true"))
    assert_ok(allowed)
    assert "the data stream starts over" in allowed.stderr
