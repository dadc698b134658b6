"""Folders that ``transformers`` saved (Llama with Llama 3's rotary scaling, GQA and an untied head; Qwen3 with
QK-norm and a head size of its own) read as our model, checked to the logit; fields we cannot honour refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from pretrain.checkpointing.loading import load_checkpoint, model_config
from pretrain.commands.export import export
from pretrain.errors import UserError
from pretrain.model.hf_check import check_against_transformers, compare_logits
from pretrain.model.hf_config import model_architecture, read_hf_config
from pretrain.model.hf_layout import load_exported_weights
from tests.helpers.hf_models import LLAMA3_ROPE, SEQ_LEN, VOCAB, save_llama, save_qwen3, transformers
from tests.helpers.runs import assert_clean_failure, assert_ok, tiny_fit_args


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_qwen3(tmp_path_factory.mktemp("hf") / "qwen3")


def test_a_llama_folder_reads_as_its_own_architecture_and_computes_its_logits(llama: Path) -> None:
    config = read_hf_config(llama, SEQ_LEN)
    assert (config.d_model, config.n_layer, config.n_head, config.n_kv_head, config.ffn_dim) == (64, 2, 4, 2, 128)
    assert (config.vocab_size, config.padded_vocab_size, config.tie_embeddings, config.qk_norm) == (
        320,
        320,
        False,
        False,
    )
    assert config.rope_base == 500_000.0 and config.rope_scaling == (8.0, 1.0, 4.0, 16)
    assert check_against_transformers(llama, config, load_exported_weights(llama, config)) is None


def test_without_llama3_scaling_the_check_fails(llama: Path, tmp_path: Path) -> None:
    config = read_hf_config(llama, SEQ_LEN)
    plain = dataclasses.replace(config, rope_factor=1.0)
    reference = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    check = compare_logits(reference, plain, load_exported_weights(llama, plain))
    assert not check.passed and check.mean_kl > 0
    # Llama 3.2's own scaling (factor 32 over 8192 positions) changes only frequencies too low to show in the
    # logits of 64 positions: the frequencies themselves are compared.
    rope = {**LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192}
    long = save_llama(tmp_path / "llama-3.2-like", rope_scaling=rope)
    config = read_hf_config(long, SEQ_LEN)
    reference = transformers.AutoModelForCausalLM.from_pretrained(long, dtype=torch.float32)
    assert compare_logits(reference, config, load_exported_weights(long, config)).passed
    plain = dataclasses.replace(config, rope_factor=1.0)
    check = compare_logits(reference, plain, load_exported_weights(long, plain))
    assert check.max_abs_diff <= 1e-3 * check.scale and not check.passed  # the logits alone would pass
    assert check.rope_rel_diff > 0.9  # the lowest frequencies are 32 times too high


def test_a_qwen3_folder_with_its_own_head_size_computes_its_logits(qwen3: Path) -> None:
    config = read_hf_config(qwen3, SEQ_LEN)
    assert (config.qk_norm, config.head_dim, config.attention_dim, config.tie_embeddings) == (True, 32, 128, True)
    reference = transformers.AutoModelForCausalLM.from_pretrained(qwen3, dtype=torch.float32)
    check = compare_logits(reference, config, load_exported_weights(qwen3, config))
    assert check.passed and check.max_abs_diff < 1e-4, check


def test_sharded_and_bf16_folders_load(tmp_path: Path) -> None:
    folder = save_qwen3(tmp_path / "sharded", max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    config = read_hf_config(folder, SEQ_LEN)
    assert check_against_transformers(folder, config, load_exported_weights(folder, config)) is None
    bf16 = tmp_path / "bf16"
    transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(bf16)
    weights = load_exported_weights(bf16, config)
    assert weights["embed.weight"].dtype == torch.bfloat16
    assert check_against_transformers(bf16, config, weights) is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("attention_bias", True, "attention_bias: True is not supported"),
        ("hidden_act", "gelu", "hidden_act: 'gelu' is not supported"),
        ("some_new_field", 3, "some_new_field not understood"),
        ("model_type", "mistral", "model_type 'mistral' is not supported"),
        ("quantization_config", {"quant_method": "gptq"}, "the weights are quantized"),
        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn' is not supported"),
        ("rope_parameters", {"partial_rotary_factor": 0.5}, "the rope parameters partial_rotary_factor are not"),
        ("rope_parameters", {**LLAMA3_ROPE, "factor": None}, "the llama3 rope scaling's factor must be a number"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_parameters and rope_scaling differ"),
    ],
)
def test_a_field_we_cannot_honour_is_refused_by_name(llama: Path, tmp_path: Path, field, value, message) -> None:
    folder = tmp_path / "changed"
    shutil.copytree(llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(UserError, match=message):
        read_hf_config(folder, SEQ_LEN)


def test_a_folder_without_config_or_safetensors_is_refused_before_anything_is_built(llama: Path, tmp_path: Path):
    no_config, bin_only = tmp_path / "no_config", tmp_path / "bin_only"
    for folder in (no_config, bin_only):
        shutil.copytree(llama, folder)
    (no_config / "config.json").unlink()
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")  # the file name is what is judged
    for folder, message in [(no_config, "has weights but no config.json"), (bin_only, "holds PyTorch .bin weights")]:
        with pytest.raises(UserError, match=rf"model.init_from {folder} {message}"):
            model_architecture("tiny", None, VOCAB, SEQ_LEN, str(folder))


@pytest.mark.parametrize("saved", ["untied without a head", "tied with a head of its own"])
def test_a_head_that_contradicts_tie_word_embeddings_is_refused_by_name(llama: Path, tmp_path: Path, saved: str):
    folder = tmp_path / "model"
    shutil.copytree(llama, folder)
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    if saved == "untied without a head":
        del weights["lm_head.weight"]
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    safetensors.torch.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    message = {"untied without a head": "lack lm_head.weight", "tied with a head of its own": "lm_head.weight differs"}
    with pytest.raises(UserError, match=message[saved]):
        load_exported_weights(folder, read_hf_config(folder, SEQ_LEN))


def test_overrides_must_agree_with_the_folder_and_the_data_must_fit_its_vocabulary(llama: Path) -> None:
    assert model_architecture("tiny", {"n_layer": 2}, VOCAB, SEQ_LEN, str(llama)).n_layer == 2
    with pytest.raises(UserError, match=r"model.overrides n_layer: 4 \(the folder's: 2\)"):
        model_architecture("tiny", {"n_layer": 4}, VOCAB, SEQ_LEN, str(llama))
    with pytest.raises(UserError, match="prepare the data with the model's own tokenizer"):
        model_architecture("tiny", None, VOCAB + 1, SEQ_LEN, str(llama))


def test_resuming_without_the_starting_folder_is_refused_naming_it(
    llama: Path, corpus, prepared: Path, tmp_path: Path, run_cli
) -> None:
    model = tmp_path / "model"
    shutil.copytree(llama, model)
    start = ("--model.init_from", str(model), "--model.overrides", "{}", "--trainer.max_steps", "2")
    assert_ok(run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, *start, "--checkpoint.every_n_train_steps", "2")))
    shutil.rmtree(model)  # the architecture is read from its config.json on resuming too
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, *start, "--ckpt_path", "last"))
    assert_clean_failure(result, f"model.init_from {model} is gone")


def test_a_run_starts_from_a_qwen3_folder_with_its_tokenizer(
    qwen3: Path, corpus, prepared: Path, tmp_path: Path, run_cli
) -> None:
    model = tmp_path / "model"
    shutil.copytree(qwen3, model)
    shutil.copy(prepared / "tokenizer.json", model / "tokenizer.json")  # as a model folder holds its tokenizer
    generation = {"eos_token_id": [3, 5], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (model / "generation_config.json").write_text(json.dumps(generation))
    start = ("--model.init_from", str(model), "--model.overrides", "{}", "--trainer.max_steps", "2")
    data = ("--data.tokenizer", str(model), "--data.data_dir", str(tmp_path / "data"))
    result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path, *start, *data))
    assert_ok(result)
    assert f"Logits of {model} match transformers'" in result.stderr
    checkpoint = load_checkpoint(tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    assert model_config(checkpoint).attention_head_dim == 32 and model_config(checkpoint).qk_norm
    # Export gives back what the public model was made for: its context (longer than the run's seq_len) and
    # its generation settings.
    exported = export(str(tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"), str(tmp_path / "out"))
    context = json.loads((qwen3 / "config.json").read_text())["max_position_embeddings"]
    assert context > model_config(checkpoint).seq_len
    assert json.loads((exported / "config.json").read_text())["max_position_embeddings"] == context
    assert json.loads((exported / "generation_config.json").read_text()) == generation
