"""A run that started from a public model's tokenizer exports it back as it came: ``tokenizer.json`` and its
companion files (chat template, special tokens, the slow tokenizer's files) byte for byte, changed only where the
Hugging Face tokenizer would otherwise give other ids than training used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, processors

from pretrain.data.prepare.tokenizer import DocumentBounds
from pretrain.data.prepare.tokenizer_files import beginning_id
from tests.helpers.runs import assert_ok, tiny_fit_args

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TEXT = "The cat sees a red bird."


def public_tokenizer_folder(prepared: Path, folder: Path, adds_bos: bool) -> dict[str, bytes]:
    """The test corpus's tokenizer laid out as ``transformers`` saves a model's: a BOS and chat tokens added,
    a post-processor that prepends the BOS (Llama 3's) or none (Qwen3's), and the companion files. Returns them."""
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    tokenizer.add_special_tokens(["<s>", "<|im_start|>", "<|im_end|>"])
    bos = tokenizer.token_to_id("<s>")
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(json.loads(tokenizer.to_str()), indent=1))  # its own layout
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": True,
    }
    files = {
        "tokenizer_config.json": json.dumps(config, indent=2).encode(),
        "special_tokens_map.json": b'{"bos_token": "<s>", "eos_token": "<|endoftext|>"}',
        "chat_template.jinja": CHAT_TEMPLATE.encode(),
        "tokenizer.model": bytes(range(256)),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return {"tokenizer.json": (folder / "tokenizer.json").read_bytes(), **files}


def fit_and_export(corpus, tmp_path: Path, tokenizer: Path, run_cli, *extra: str) -> tuple[Path, str]:
    args = tiny_fit_args(corpus[0], tmp_path / "data", tmp_path / "logs", "--data.tokenizer", str(tokenizer), *extra)
    assert_ok(run_cli(*args, "--trainer.max_steps", "2"))
    checkpoint = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    exported = run_cli("export", str(checkpoint), str(tmp_path / "hf"))
    assert_ok(exported)
    return tmp_path / "hf", exported.stdout


def test_a_tokenizer_that_encodes_as_training_did_comes_back_byte_for_byte(corpus, prepared, tmp_path, run_cli):
    source = public_tokenizer_folder(prepared, tmp_path / "model", adds_bos=False)
    hf, printed = fit_and_export(corpus, tmp_path, tmp_path / "model", run_cli)
    assert {name: (hf / name).read_bytes() for name in source} == source
    assert "Changed" not in printed
    config = json.loads((hf / "config.json").read_text())
    tokenizer = Tokenizer.from_str(source["tokenizer.json"].decode())
    assert config["bos_token_id"] == tokenizer.token_to_id("<s>")  # the tokenizer's own BOS, as it names it
    assert config["eos_token_id"] == tokenizer.token_to_id("<|endoftext|>")


def test_a_bos_training_did_not_add_is_taken_out_and_everything_else_comes_back(corpus, prepared, tmp_path, run_cli):
    transformers = pytest.importorskip("transformers")
    source = public_tokenizer_folder(prepared, tmp_path / "model", adds_bos=True)
    hf, printed = fit_and_export(corpus, tmp_path, tmp_path / "model", run_cli)
    assert "Changed from the tokenizer's own files: tokenizer.json: its post-processor is left out" in printed
    assert "tokenizer_config.json: add_bos_token=False, add_eos_token=False" in printed
    for name in ("special_tokens_map.json", "chat_template.jinja", "tokenizer.model"):
        assert (hf / name).read_bytes() == source[name]
    exported, original = (json.loads((hf / "tokenizer.json").read_text()), json.loads(source["tokenizer.json"]))
    assert exported["post_processor"] is None
    assert {**exported, "post_processor": original["post_processor"]} == original  # nothing else changed
    config = json.loads((hf / "tokenizer_config.json").read_text())
    assert config == {**json.loads(source["tokenizer_config.json"]), "add_bos_token": False, "add_eos_token": False}

    loaded = transformers.AutoTokenizer.from_pretrained(hf)
    plain = Tokenizer.from_str(source["tokenizer.json"].decode()).encode(TEXT, add_special_tokens=False).ids
    assert loaded(TEXT)["input_ids"] == plain  # the ids training stored
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.bos_token, loaded.eos_token) == ("<s>", "<|endoftext|>")
    assert loaded.convert_tokens_to_ids("<s>") == json.loads((hf / "config.json").read_text())["bos_token_id"]


@pytest.mark.parametrize("adds_bos", [True, False], ids=["its-post-processor-adds-it", "it-has-none"])
def test_a_bos_training_added_is_added_by_the_exported_tokenizer(corpus, prepared, tmp_path, run_cli, adds_bos):
    transformers = pytest.importorskip("transformers")
    source = public_tokenizer_folder(prepared, tmp_path / "model", adds_bos=adds_bos)
    hf, printed = fit_and_export(corpus, tmp_path, tmp_path / "model", run_cli, "--data.bos_token", "<s>")
    same = source if adds_bos else {name: content for name, content in source.items() if name.endswith(".model")}
    assert {name: (hf / name).read_bytes() for name in same} == same
    assert ("Changed" in printed) != adds_bos
    tokenizer = Tokenizer.from_str(source["tokenizer.json"].decode())
    bos = tokenizer.token_to_id("<s>")
    loaded = transformers.AutoTokenizer.from_pretrained(hf)
    assert loaded(TEXT)["input_ids"] == [bos, *tokenizer.encode(TEXT, add_special_tokens=False).ids]
    assert json.loads((hf / "config.json").read_text())["bos_token_id"] == bos


def test_the_beginning_of_text_is_the_bos_training_added_else_the_tokenizer_s_own_else_end_of_text(prepared):
    """config.json's bos_token_id and the in-loop evals' empty context agree with what a Hugging Face reader sees."""
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    tokenizer.add_special_tokens(["<s>", "<t>"])
    s, t, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("<t>"), tokenizer.token_to_id("<|endoftext|>")
    named = {"tokenizer_config.json": b'{"bos_token": "<s>"}'}
    as_added_token = {"tokenizer_config.json": b'{"bos_token": {"content": "<s>", "special": true}}'}
    unknown = {"tokenizer_config.json": b'{"bos_token": "<|begin_of_text|>"}'}
    assert beginning_id(tokenizer, named, DocumentBounds(eos, bos=t)) == t
    assert beginning_id(tokenizer, named, DocumentBounds(eos)) == s
    assert beginning_id(tokenizer, as_added_token, DocumentBounds(eos)) == s
    assert beginning_id(tokenizer, unknown, DocumentBounds(eos)) == eos
    assert beginning_id(tokenizer, {}, DocumentBounds(eos)) == eos
