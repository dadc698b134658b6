"""A finished run: generation, Hugging Face export, continued pretraining, evaluation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tokenizers import Tokenizer, processors

from pretrain.checkpointing.loading import (
    checkpoint_eos_id,
    load_checkpoint,
    load_model,
    load_tokenizer_from_checkpoint,
)
from pretrain.commands import generate as generate_module
from pretrain.commands.export import export
from pretrain.commands.generate import generate, generate_each, generate_rows
from pretrain.data.prepare.tokenizer import DocumentBounds, eos_id
from pretrain.errors import UserError
from pretrain.model.config import LlamaConfig
from pretrain.model.llama import Llama
from pretrain.train.module import PretrainModule
from tests.helpers.runs import assert_ok, tiny_fit_args


def test_generate_prints_prompt_and_greedy_continuation(trained: Path, run_cli) -> None:
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    args = ("generate", ckpt, "--prompt", "The cat", "--max_new_tokens", "12", "--temperature", "0")
    first, second = run_cli(*args), run_cli(*args)
    assert_ok(first)
    assert first.stdout.startswith("The cat") and len(first.stdout.strip()) > len("The cat")
    assert first.stdout == second.stdout  # greedy is deterministic
    sampled = run_cli(*args[:-1], "1.0", "--top_k", "5")
    assert sampled.returncode == 0 and sampled.stdout.startswith("The cat")


def test_cached_generation_matches_recomputing_everything(trained: Path) -> None:
    checkpoint = load_checkpoint(trained / "checkpoints" / "last.ckpt")
    model = load_model(checkpoint)
    prompt = load_tokenizer_from_checkpoint(checkpoint).encode("The dog sees").ids
    cached = generate(model, prompt, max_new_tokens=15)
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(15):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1, : model.config.vocab_size].argmax()))
    assert cached == tokens[len(prompt) :]


def test_prompts_decoded_together_continue_as_each_alone() -> None:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=40, seq_len=24, d_model=32, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=48))
    model.init_weights(0)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    alone = [generate(model, prompt, 12) for prompt in prompts]
    assert generate_rows(model, prompts, 12, [0.0] * 3) == alone
    stop = alone[0][4]  # row 0 stops there; a row that never writes it runs to the end
    alone = [generate(model, prompt, 12, stop_id=stop) for prompt in prompts]
    assert len(alone[0]) <= 5 and generate_rows(model, prompts, 12, [0.0] * 3, stop_id=stop) == alone
    # Mixed lengths and limits: grouped by length, each cut to its own limit; the context's end stops them all.
    requests = [([1, 2], 0.0, 30), ([3, 4, 5], 0.0, 4), ([6, 7], 0.0, 3)]
    assert generate_each(model, requests) == [generate(model, ids, limit) for ids, _, limit in requests]
    assert len(generate_each(model, requests)[0]) == 22  # seq_len 24 minus the prompt's 2 tokens
    sampled = [generate_each(model, [([1, 2], 1.0, 8)] * 2, 5, None, torch.Generator().manual_seed(3)) for _ in "ab"]
    assert sampled[0] == sampled[1] and sampled[0][0] != sampled[0][1]  # seeded; each row draws its own tokens


def test_ids_past_the_tokenizer_s_vocabulary_are_never_sampled() -> None:
    """A public model's embedding has rows past its tokenizer's ids (padding): they decode to nothing."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=40, seq_len=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=48))
    model.init_weights(0)
    with torch.no_grad():
        model.lm_head.weight[30:] *= 50  # padding rows the model would otherwise favour
    drawn = generate_each(model, [([1, 2], 1.0, 60)] * 4, None, None, torch.Generator().manual_seed(0))
    assert max(max(row) for row in drawn) >= 30
    drawn = generate_each(model, [([1, 2], 1.0, 60)] * 4, None, None, torch.Generator().manual_seed(0), 30)
    assert max(max(row) for row in drawn) < 30


def test_sharded_checkpoint_folder_is_read_like_a_file(trained: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    folder = tmp_path / "sharded.ckpt"  # the layout Lightning's FSDP strategy writes
    dcp.save({"model": checkpoint.pop("state_dict")}, checkpoint_id=folder)
    torch.save({k: v for k, v in checkpoint.items() if k != "optimizer_states"}, folder / "meta.pt")
    from_folder, from_file = (
        load_model(load_checkpoint(folder)),
        load_model(load_checkpoint(trained / "checkpoints" / "last.ckpt")),
    )
    ids = torch.randint(0, 300, (2, 10))
    torch.testing.assert_close(from_folder(ids), from_file(ids))


def test_export_loads_in_transformers_with_the_same_logits(trained: Path, tmp_path: Path, run_cli) -> None:
    transformers = pytest.importorskip("transformers")
    checkpoint_path = trained / "checkpoints" / "last.ckpt"
    result = run_cli("export", str(checkpoint_path), str(tmp_path / "hf"))
    assert_ok(result)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    checkpoint = load_checkpoint(checkpoint_path)
    ours, tokenizer = load_model(checkpoint), load_tokenizer_from_checkpoint(checkpoint)
    text = "The red bird eats.\nA small house"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"]) == text
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


def test_export_never_leaves_a_half_folder_or_overwrites(trained: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        export(str(trained / "checkpoints" / "last.ckpt"), str(tmp_path / "taken"))
    with pytest.raises(UserError, match="does not exist"):
        export(str(tmp_path / "missing.ckpt"), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("source", ["checkpoint", "exported"])
def test_init_from_loads_weights_only(trained: Path, tmp_path: Path, source: str) -> None:
    checkpoint_path = trained / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(checkpoint_path)
    path = str(checkpoint_path) if source == "checkpoint" else str(export(str(checkpoint_path), str(tmp_path / "hf")))
    hparams = checkpoint["hyper_parameters"]
    module = PretrainModule(
        overrides=hparams["overrides"], vocab_size=hparams["vocab_size"], seq_len=hparams["seq_len"], init_from=path
    )
    module.configure_model()
    expected = load_model(checkpoint).state_dict()
    for name, tensor in module.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
    wrong = {
        "overrides": {**hparams["overrides"], "d_model": 32},
        "vocab_size": hparams["vocab_size"],
        "init_from": path,
    }
    if source == "exported":  # a folder's config.json defines the architecture: other values are refused at once
        with pytest.raises(UserError, match=r"model.overrides d_model: 32 \(the folder's: 64\) differ"):
            PretrainModule(**wrong)
        return
    with pytest.raises(UserError, match=r"embed\.weight: \(320, 64\) vs config \(320, 32\)"):
        PretrainModule(**wrong).configure_model()


def test_continued_pretraining_through_the_cli(corpus, prepared: Path, trained: Path, tmp_path: Path, run_cli) -> None:
    ckpt = tmp_path / "source.ckpt"
    shutil.copy(trained / "checkpoints" / "last.ckpt", ckpt)
    short = (
        "--model.init_from",
        str(ckpt),
        "--model.lr_scheduler.init_args.max_steps",
        "3",
        "--model.lr_scheduler.init_args.warmup_steps",
        "1",
    )
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, *short, "--trainer.max_steps", "2"))
    assert_ok(result)
    state = torch.load(tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2  # a new run (fresh optimizer and schedule), from trained weights
    ckpt.unlink()  # resuming reads the run's own checkpoint, not the init_from weights it replaces
    result = run_cli(
        *tiny_fit_args(corpus[0], prepared, tmp_path, *short, "--trainer.max_steps", "3", "--ckpt_path", "last")
    )
    assert_ok(result)
    state = torch.load(tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluate_a_checkpoint(corpus, prepared: Path, trained: Path, stage: str, run_cli) -> None:
    args = tiny_fit_args(corpus[0], prepared, trained.parents[1])
    args[0] = stage
    result = run_cli(*args, "--ckpt_path", "last")
    assert_ok(result)
    assert f"{stage if stage == 'test' else 'val'}/loss" in result.stdout and "ppl" in result.stdout


def test_a_special_token_string_in_a_prompt_is_text(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in training, where "<|endoftext|>" inside a document stays text: only real document ends are eos."""
    checkpoint = load_checkpoint(trained / "checkpoints" / "last.ckpt")
    tokenizer = load_tokenizer_from_checkpoint(checkpoint)
    seen = []
    monkeypatch.setattr(generate_module, "generate", lambda model, ids, *args, **kwargs: seen.append(ids) or [])
    eos = checkpoint_eos_id(checkpoint, tokenizer)
    assert eos == eos_id(tokenizer)  # recorded with the tokenizer
    bounds = DocumentBounds(eos)
    generate_module.continue_text(load_model(checkpoint), tokenizer, bounds, "a <|endoftext|> b", max_new_tokens=1)
    assert eos not in seen[0]
    assert tokenizer.decode(seen[0], skip_special_tokens=False) == "a <|endoftext|> b"


def test_a_prompt_begins_as_each_training_document_began(prepared: Path) -> None:
    """After the token the build put before each document (data.bos_token) where it put one; an empty prompt is
    that token alone, else the end-of-text token that ends the document before."""
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    eos, text = eos_id(tokenizer), tokenizer.encode("The dog", add_special_tokens=False).ids
    assert generate_module.prompt_ids(tokenizer, "The dog", DocumentBounds(eos)) == text
    assert generate_module.prompt_ids(tokenizer, "", DocumentBounds(eos)) == [eos]
    assert generate_module.prompt_ids(tokenizer, "The dog", DocumentBounds(eos, bos=7)) == [7, *text]
    assert generate_module.prompt_ids(tokenizer, "", DocumentBounds(eos, bos=7)) == [7]


def test_export_of_a_supplied_tokenizer_gives_the_ids_training_used(
    corpus, prepared: Path, tmp_path: Path, run_cli
) -> None:
    """A Llama-3-style tokenizer.json whose post-processor prepends a BOS: training never saw that BOS, so the
    exported Hugging Face tokenizer must not add it either."""
    transformers = pytest.importorskip("transformers")
    supplied = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    supplied.add_special_tokens(["<s>"])
    supplied.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", supplied.token_to_id("<s>"))]
    )
    supplied.save(str(tmp_path / "tokenizer.json"))
    assert supplied.encode("The cat").ids[0] == supplied.token_to_id("<s>")  # it does add one by default
    args = tiny_fit_args(
        corpus[0],
        tmp_path / "data",
        tmp_path / "logs",
        "--data.tokenizer",
        str(tmp_path / "tokenizer.json"),
        "--trainer.max_steps",
        "2",
    )
    assert run_cli(*args).returncode == 0
    checkpoint = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert run_cli("export", str(checkpoint), str(tmp_path / "hf")).returncode == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The cat sees a red bird."
    assert hf_tokenizer(text)["input_ids"] == supplied.encode(text, add_special_tokens=False).ids
    assert hf_tokenizer.bos_token_id == hf_tokenizer.eos_token_id == eos_id(supplied)  # as config.json says
    exported = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))  # as any other reader sees it
    assert exported.encode(text).ids == supplied.encode(text, add_special_tokens=False).ids


def test_sampling_a_diverged_model_s_logits_takes_the_largest_instead_of_failing() -> None:
    logits = torch.tensor([0.0, float("inf"), 1.0, float("nan")])
    assert generate_module.sample_next(logits, temperature=0.8, top_k=None) == 1
    assert generate_module.sample_next(torch.tensor([0.0, 30.0, 1.0]), temperature=0.8, top_k=2) == 1
