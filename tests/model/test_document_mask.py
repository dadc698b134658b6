"""Document masking: a packed block's logits are each document's own, on both attention paths; the work counted."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from pretrain.callbacks.throughput import causal_share, flops_per_token
from pretrain.model.config import LlamaConfig
from pretrain.model.document_mask import attended_pairs, document_ids, document_mask
from pretrain.model.llama import build_model
from tests.helpers.runs import assert_ok, scalars_by_step, tiny_fit_args

EOT = 0
CONFIG = LlamaConfig(vocab_size=64, seq_len=48, d_model=32, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=64, qk_norm=True)


def documents(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    """Documents of these lengths (end-of-text included, closing each), with no end-of-text inside."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(1, 64, (n - 1,), generator=generator), torch.tensor([EOT])]) for n in lengths]


def test_document_ids_count_the_end_of_text_tokens_before_each_token() -> None:
    inputs = torch.tensor([[5, 0, 7, 8, 0, 0, 9], [0, 1, 2, 3, 4, 5, 6]])
    assert document_ids(inputs, EOT).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("block_sparse", [False, True], ids=["sdpa-boolean-mask", "flex-attention"])
def test_a_packed_block_gives_each_document_the_logits_it_gets_alone(block_sparse: bool) -> None:
    model = build_model(CONFIG, "cpu", seed=0)
    rows = [documents(7, 1, 20, 30, seed=1), documents(48, seed=2), documents(3, 40, 9, seed=3)]  # the last ones cut
    packed = torch.stack([torch.cat(row)[: CONFIG.seq_len] for row in rows])  # (3, 48)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention on CPU, uncompiled: the slow reference path, fine here
        logits = model(packed, mask=document_mask(packed, EOT, block_sparse=block_sparse))
        for b, row in enumerate(rows):
            start = 0
            for document in row:
                alone = document[: CONFIG.seq_len - start]
                if alone.numel() == 0:
                    break
                expected = model(alone[None])[0]  # run alone, from position 0
                torch.testing.assert_close(logits[b, start : start + alone.numel()], expected, atol=2e-5, rtol=1e-4)
                start += alone.numel()
        causal = model(packed)
    assert not torch.allclose(causal[0, 7:], logits[0, 7:], atol=1e-3)  # the mask does change what is attended


def test_compiled_flex_attention_gives_the_eager_boolean_mask_s_logits() -> None:
    """The path CUDA runs (the model compiled around FlexAttention), here compiled for the CPU."""
    config = LlamaConfig(vocab_size=64, seq_len=128, d_model=32, n_layer=1, n_head=4, n_kv_head=2, ffn_dim=64)
    model = build_model(config, "cpu", seed=0)
    packed = torch.cat(documents(30, 50, 70, seed=6))[None, : config.seq_len]
    with torch.no_grad():
        compiled = torch.compile(model)(packed, mask=document_mask(packed, EOT, block_sparse=True))
        eager = model(packed, mask=document_mask(packed, EOT, block_sparse=False))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_the_attended_pairs_are_the_mask_s_and_causal_blocks_count_fully() -> None:
    packed = torch.stack([torch.cat(documents(5, 9, 10, seed=4)), torch.cat(documents(24, seed=5))])  # (2, 24)
    mask = document_mask(packed, EOT, block_sparse=False)
    assert attended_pairs(packed, EOT).item() == mask.sum().item() == (15 + 45 + 55) + 300
    no_documents = torch.randint(1, 64, (2, 25))
    assert causal_share(no_documents, EOT).item() == pytest.approx(1.0)
    share = causal_share(torch.cat([packed, packed[:, :1]], dim=1), EOT)  # blocks of seq_len + 1
    assert share.item() == pytest.approx(415 / (2 * 24 * 25 / 2))
    full, attention_free = flops_per_token(CONFIG), flops_per_token(CONFIG, 0.0)
    assert flops_per_token(CONFIG, 0.25) == pytest.approx(attention_free + 0.25 * (full - attention_free))


def test_training_under_the_document_mask_from_the_config(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    """The switch reaches training and validation: the losses are finite and differ from causal attention's."""
    runs = {}
    for mask in ("causal", "document"):
        result = run_cli(
            *tiny_fit_args(
                corpus[0], prepared, tmp_path / mask, "--model.attention_mask", mask, "--trainer.max_steps", "20"
            )
        )
        assert_ok(result)
        run_dir = tmp_path / mask / "quickstart" / "version_0"
        runs[mask] = (scalars_by_step(run_dir, "train/loss"), scalars_by_step(run_dir, "val/loss"))
    assert runs["document"][0][0] == pytest.approx(runs["causal"][0][0], rel=1e-3)  # same start: near-uniform
    assert runs["document"][0] != runs["causal"][0] and runs["document"][1] != runs["causal"][1]
    assert all(torch.isfinite(torch.tensor(list(losses.values()))).all() for losses in runs["document"])
