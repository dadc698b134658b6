"""Weighted mixtures: one tokenizer, a build per dataset, sampling by weight, exact resume."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import re
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from pretrain.commands.cli import data_module_from_args
from pretrain.data import PretrainData
from pretrain.data.block_loader import BlockLoader
from pretrain.data.prepare.mixture import check_mixture
from pretrain.errors import UserError
from tests.helpers.resume import check_mixture_resume
from tests.helpers.runs import ROOT, TINY_VOCAB, assert_ok, scalars_by_step, tiny_fit_args


def test_each_dataset_is_built_with_the_shared_tokenizer_and_the_manifest_says_how(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    parts = {name: json.loads((built / name / "manifest.json").read_text()) for name in ("letters", "digits")}
    assert {m["tokenizer"]["sha256"] for m in parts.values()} == {manifest["tokenizer"]["sha256"]}
    assert {name: (m["weight"], m["share"]) for name, m in manifest["mixture"].items()} == {
        "letters": (3, 0.75),
        "digits": (1, 0.25),
    }
    for split in ("train", "val"):
        assert manifest["splits"][split]["tokens"] == sum(m["splits"][split]["tokens"] for m in parts.values())
        assert manifest["mixture"]["letters"]["splits"][split] == parts["letters"]["splits"][split]
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 72


def mixture_loader(mixture: dict, built: Path, **options: int) -> BlockLoader:
    data = PretrainData(
        mixture=mixture,
        data_dir=str(built),
        vocab_size=TINY_VOCAB,
        val_fraction=0.1,
        **{"seq_len": 16, "batch_size": 8, "num_workers": 0, **options},
    )
    data.setup("fit")
    return data.train_dataloader()


def first_batches(loader: BlockLoader, count: int) -> list[torch.Tensor]:
    """The loader's first ``count`` batches, over as many of its iterators (Lightning's epochs) as it takes."""
    return list(itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), count))


def test_training_samples_follow_the_weights_and_the_seed(mixture: dict, built: Path) -> None:
    def stream(seed: int, workers: int = 0) -> list[list[int]]:
        loader = mixture_loader(mixture, built, seed=seed, num_workers=workers)
        sequences = [seq for batch in first_batches(loader, 60) for seq in batch.tolist()]
        digits = list(mixture).index("digits")
        assert loader.state.taken[digits] > loader.reader.sizes[digits]  # ran out and went on with its next pass
        return sequences

    decode = Tokenizer.from_file(str(built / "tokenizer.json")).decode
    first = stream(seed=7)
    origins = ["digits" if any(c.isdigit() for c in decode(seq)) else "letters" for seq in first]
    assert len(origins) == 480
    for end in range(4, 481, 4):  # weights 3 : 1, in every stretch of samples
        assert origins[:end].count("letters") == 3 * end // 4
    assert stream(seed=7, workers=2) == first  # deterministic from the seed, whatever the workers
    assert stream(seed=8) != first


@pytest.mark.parametrize("workers", [0, 2])
def test_the_mixture_loader_resumes_exactly_wherever_it_stopped(mixture: dict, built: Path, workers: int) -> None:
    """Stopped after n batches, before and after the digits have run out and started their next pass (about every
    33 batches here); the loader's workers draw batches ahead of the ones handed out."""
    reference = first_batches(mixture_loader(mixture, built, num_workers=workers), 60)
    for n in (10, 45):
        stopped = mixture_loader(mixture, built, num_workers=workers)
        first_batches(stopped, n)
        resumed = mixture_loader(mixture, built, num_workers=workers)
        resumed.load_state_dict(stopped.state_dict())
        rest = first_batches(resumed, 60 - n)
        assert all(torch.equal(a, b) for a, b in zip(reference[n:], rest, strict=True)), n


def test_a_dataset_without_one_whole_block_is_refused_with_the_fix(mixture: dict, built: Path) -> None:
    with pytest.raises(UserError, match=r"digits/train holds fewer than 100001 tokens in every chunk.*data.seq_len"):
        mixture_loader(mixture, built, seq_len=100_000)


def test_new_weights_reuse_the_build_and_the_manifest_follows(mixture: dict, built: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(built, data_dir)
    reweighted = {**mixture, "digits": {**mixture["digits"], "weight": 3}}
    chunks = sorted((data_dir / "letters" / "train").glob("*.bin"))
    stamps = [path.stat().st_mtime_ns for path in chunks]
    PretrainData(mixture=reweighted, data_dir=str(data_dir), vocab_size=TINY_VOCAB, val_fraction=0.1).build()
    assert [path.stat().st_mtime_ns for path in chunks] == stamps  # not rebuilt
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert {name: m["share"] for name, m in manifest["mixture"].items()} == {"letters": 0.5, "digits": 0.5}


def test_a_config_that_does_not_match_the_build_is_refused(mixture: dict, built: Path) -> None:
    single = PretrainData(data_dir=str(built), vocab_size=TINY_VOCAB)
    with pytest.raises(UserError, match=r"holds the mixture \['digits', 'letters'\], but data.mixture is not set"):
        single.setup("fit")


def test_a_mixture_run_resumes_exactly(mixture: dict, built: Path, tmp_path: Path, run_cli) -> None:
    check_mixture_resume(run_cli, built, mixture, tmp_path, processes=1)  # two processes: tests/e2e
    assert multiprocessing.active_children() == []  # each run stopped its loader workers at its end


def test_validation_reports_each_dataset_and_all_together(mixture: dict, built: Path, tmp_path: Path, run_cli) -> None:
    extra = (
        "--data.sources",
        "null",
        "--data.mixture",
        json.dumps(mixture),
        "--data.batch_size",
        "2",
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "3",
    )
    result = run_cli(*tiny_fit_args(Path("unused"), built, tmp_path, *extra))
    assert_ok(result)
    run_dir = tmp_path / "quickstart" / "version_0"
    total = scalars_by_step(run_dir, "val/loss")
    per_dataset = {name: scalars_by_step(run_dir, f"val/{name}/loss") for name in mixture}
    assert list(per_dataset["letters"]) == list(per_dataset["digits"]) == list(total) == [2, 5]
    for step, loss in total.items():  # the total weighs each dataset's loss by its held-out tokens
        losses = [per_dataset[name][step] for name in mixture]
        assert min(losses) < loss < max(losses)
    total_bpb = scalars_by_step(run_dir, "val/bpb")
    for step, bpb in total_bpb.items():  # ... and its bits per byte by its held-out bytes
        per_dataset_bpb = [scalars_by_step(run_dir, f"val/{name}/bpb")[step] for name in mixture]
        assert min(per_dataset_bpb) < bpb < max(per_dataset_bpb)


@pytest.mark.parametrize(
    ("mixture", "message"),
    [
        ({}, "must map dataset names"),
        ({"a": {"sources": ["x"], "weight": 0}}, "weight must be a positive number"),
        ({"a": {"sources": "x", "weight": 1}}, "sources must be a non-empty list"),
        ({"a/b": {"sources": ["x"], "weight": 1}}, "becomes a folder"),
        ({"a": {"sources": ["x"], "weigth": 1}}, r"must be \{sources"),
    ],
)
def test_bad_mixtures_are_refused_with_the_fix(mixture: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        check_mixture(mixture)


def test_sources_and_mixture_together_are_refused() -> None:
    with pytest.raises(UserError, match=re.escape("either data.sources or data.mixture")):
        PretrainData(sources=["stdlib"], mixture={"a": {"sources": ["x"], "weight": 1}})


def test_prepare_alone_reads_the_mixture_laid_over_a_config() -> None:
    configs = ROOT / "configs"
    data = data_module_from_args(
        ["--config", str(configs / "quickstart.yaml"), "--config", str(configs / "mixture.yaml")]
    )
    assert set(data.datasets) == {"code", "prose"}
    assert data.data_dir == "data/mixture" and data.vocab_size == 4096  # the rest from the first config
