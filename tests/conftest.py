"""Shared fixtures: a small corpus, its shards and one trained run, each built once per session; the two tiers;
and a guard that fails any test leaving the checkout changed."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pretrain.data import PretrainData
from pretrain.data.prepare.build import prepare
from tests.helpers.corpora import make_corpus, write_docs
from tests.helpers.resume import TRAINED_STEPS
from tests.helpers.runs import ROOT, TINY_VOCAB, Result, run_in_process, run_quietly, tiny_fit_args

END_TO_END = ROOT / "tests" / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/e2e/ (subprocesses, signals, several processes) form the end-to-end tier."""
    for item in items:
        if END_TO_END in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


def checkout_state() -> str | None:
    """What git sees changed or added in the checkout, ignored files included (caches and the venv left out)."""
    try:
        listing = subprocess.run(
            ["git", "status", "--porcelain", "--ignored=matching"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout
    caches = ("__pycache__", ".pytest_cache", ".ruff_cache", ".egg-info", ".venv/", ".whl/")
    return "\n".join(line for line in listing.splitlines() if not any(cache in line for cache in caches))


@pytest.fixture(autouse=True)
def checkout_stays_clean() -> Iterator[None]:
    before = checkout_state()
    yield
    after = checkout_state()
    if before is not None and after != before:
        new = sorted(set(after.splitlines()) - set(before.splitlines()))
        pytest.fail(f"The test changed the checkout (tests must write under tmp_path): {new}")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


@pytest.fixture(scope="session")
def prepared(corpus: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus tokenized into shards with a tiny trained tokenizer (read-only for tests)."""
    data_dir = tmp_path_factory.mktemp("data")
    prepare([str(corpus[0])], str(data_dir), vocab_size=TINY_VOCAB, val_fraction=0.1)
    return data_dir


@pytest.fixture(scope="session")
def trained(corpus, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of one short quickstart run (text samples, throughput), shared by every test that reads
    a finished run; read-only."""
    logs = tmp_path_factory.mktemp("trained")
    run_quietly(tiny_fit_args(corpus[0], prepared, logs, "--trainer.max_steps", str(TRAINED_STEPS)), logs)
    return logs / "quickstart" / "version_0"


@pytest.fixture(scope="session")
def mixture(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Letters weighted 3, digits 1: a sequence's characters tell which dataset it came from."""
    root = tmp_path_factory.mktemp("mixture")
    letters = write_docs(root / "letters", ["cat", "dog", "tree", "house", "river"])
    digits = write_docs(root / "digits", ["1234", "5678", "90", "13"], n_docs=12, seed=1)  # runs out first
    return {"letters": {"sources": [str(letters)], "weight": 3}, "digits": {"sources": [str(digits)], "weight": 1}}


@pytest.fixture(scope="session")
def built(mixture: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("mixture-data")
    PretrainData(mixture=mixture, data_dir=str(data_dir), vocab_size=TINY_VOCAB, val_fraction=0.1).build()
    return data_dir


@pytest.fixture
def run_cli(tmp_path: Path, capsys, caplog, monkeypatch) -> Callable[..., Result]:
    """``run_cli(*args, cwd=tmp_path)``: the ``pretrain`` command in this process."""

    def run(*args: str, cwd: Path = tmp_path) -> Result:
        return run_in_process(list(args), cwd, capsys, caplog, monkeypatch)

    return run
