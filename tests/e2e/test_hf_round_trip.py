"""A public model's folder in and out again, through the command line: a Llama folder that ``transformers`` saved,
with its tokenizer -> ``fit --model.init_from`` (checked to the logit) -> resumed -> ``export`` -> ``transformers``
loads the export and computes the trained model's logits; the export holds the folder's tokenizer files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from pretrain.checkpointing.loading import load_checkpoint, model_config, model_state_dict
from pretrain.model.hf_check import compare_logits
from pretrain.model.hf_config import read_hf_config
from tests.helpers.hf_models import SEQ_LEN, save_llama, transformers
from tests.helpers.runs import assert_ok, run_main, tiny_fit_args


def test_a_llama_folder_trains_resumes_and_exports_back(corpus, prepared: Path, tmp_path: Path) -> None:
    model = save_llama(tmp_path / "model")
    shutil.copy(prepared / "tokenizer.json", model / "tokenizer.json")  # as a model folder holds its tokenizer
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "chat_template": "{{ x }}"}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    start = ("--model.init_from", str(model), "--model.overrides", "{}", "--data.tokenizer", str(model))
    start += ("--data.data_dir", str(tmp_path / "data"))
    first = run_main(*tiny_fit_args(corpus[0], prepared, tmp_path, *start, "--trainer.max_steps", "20"), cwd=tmp_path)
    assert_ok(first)
    assert f"Logits of {model} match transformers'" in first.stderr
    more = ("--trainer.max_steps", "30", "--ckpt_path", "last")
    resumed = run_main(*tiny_fit_args(corpus[0], prepared, tmp_path, *start, *more), cwd=tmp_path)
    assert_ok(resumed)
    assert "Logits of" not in resumed.stderr  # the checkpoint's weights, not the folder's, are loaded

    last = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 30
    assert model_config(checkpoint) == read_hf_config(model, SEQ_LEN)  # the folder's architecture throughout
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((model / "tokenizer.json").read_bytes()).hexdigest()

    assert_ok(run_main("export", str(last), str(tmp_path / "exported"), cwd=tmp_path))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32)
    check = compare_logits(reference, model_config(checkpoint), model_state_dict(checkpoint))
    assert check.passed and check.max_abs_diff < 1e-4, check
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the folder's tokenizer files, as they were
        assert (tmp_path / "exported" / name).read_bytes() == (model / name).read_bytes()
