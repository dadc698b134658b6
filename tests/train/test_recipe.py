"""Recipe switches: QK-norm (and its export as Qwen3), the z-loss, and the quickstart's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.checkpointing.loading import load_checkpoint, load_model
from pretrain.commands.export import export
from pretrain.model.config import LlamaConfig
from pretrain.model.llama import Llama
from pretrain.model.losses import loss_of_logits
from pretrain.train.module import PretrainModule
from tests.helpers.runs import ROOT, TINY_MODEL, assert_ok, scalars_by_step, tiny_fit_args

QK_NORM = TINY_MODEL.replace("}", ", qk_norm: true}")


def test_qk_norm_normalises_each_heads_queries_and_keys() -> None:
    config = LlamaConfig(
        vocab_size=64, seq_len=16, d_model=32, n_layer=1, n_head=2, n_kv_head=1, ffn_dim=64, qk_norm=True
    )
    model = Llama(config)
    model.init_weights(0)
    attention = model.blocks[0].attn
    assert attention.q_norm.weight.shape == attention.k_norm.weight.shape == (16,)  # per head
    assert torch.equal(attention.q_norm.weight, torch.ones(16))
    seen = {}
    attention.q_norm.register_forward_hook(lambda module, args, out: seen.setdefault("q", out))
    model(torch.randint(0, 64, (2, 8)))
    rms = seen["q"].pow(2).mean(-1).sqrt()  # (B, H, T): every head's query has unit RMS before the rotary
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-2, rtol=0)  # up to the norm's epsilon
    plain = Llama(LlamaConfig(**{**config.__dict__, "qk_norm": False}))
    assert len(list(model.parameters())) == len(list(plain.parameters())) + 2


def test_qk_norm_exports_as_qwen3_with_the_same_logits(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    transformers = pytest.importorskip("transformers")
    result = run_cli(
        *tiny_fit_args(corpus[0], prepared, tmp_path, "--model.overrides", QK_NORM, "--trainer.max_steps", "3")
    )
    assert_ok(result)
    checkpoint = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    folder = export(str(checkpoint), str(tmp_path / "exported"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf_model).__name__ == "Qwen3ForCausalLM"
    loaded = load_checkpoint(checkpoint)
    ours = load_model(loaded)
    ids = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    # And back: an exported folder's weights start a run of the same shape.
    hparams = loaded["hyper_parameters"]
    module = PretrainModule(
        overrides=hparams["overrides"],
        vocab_size=hparams["vocab_size"],
        seq_len=hparams["seq_len"],
        init_from=str(folder),
    )
    module.configure_model()
    for name, tensor in module.model.state_dict().items():
        torch.testing.assert_close(tensor, ours.state_dict()[name], msg=name)


def test_the_loss_terms_with_and_without_z_loss_agree() -> None:
    """One log-sum-exp serves the cross-entropy and the z-loss term; per token, each target's loss."""
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    per_target = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 5)
    loss, z = loss_of_logits(logits, targets, z_loss=True)
    torch.testing.assert_close(loss, per_target.mean())
    torch.testing.assert_close(z, torch.logsumexp(logits, -1).square().mean())
    assert loss_of_logits(logits, targets).z is None
    torch.testing.assert_close(loss_of_logits(logits, targets).ce, loss)
    torch.testing.assert_close(loss_of_logits(logits, targets, per_token=True).ce, per_target)
    torch.testing.assert_close(loss_of_logits(logits, targets, z_loss=True, per_token=True).ce, per_target)


def test_z_loss_is_logged_and_trained_on(corpus, prepared: Path, tmp_path: Path, run_cli) -> None:
    losses = {}
    for weight in ("0", "0.1"):
        logs = tmp_path / weight
        result = run_cli(
            *tiny_fit_args(corpus[0], prepared, logs, "--model.z_loss", weight, "--trainer.max_steps", "3")
        )
        assert_ok(result)
        losses[weight] = scalars_by_step(logs / "quickstart" / "version_0", "train/loss")
    z_loss = scalars_by_step(tmp_path / "0.1" / "quickstart" / "version_0", "train/z_loss")
    assert sorted(z_loss) == [0, 1, 2] and all(value > 0 for value in z_loss.values())
    assert losses["0"][0] == pytest.approx(losses["0.1"][0], rel=1e-6)  # the cross-entropy alone, before any update
    assert losses["0"][2] != losses["0.1"][2]  # the z-loss's gradient changed the weights


def test_the_quickstart_runs_its_recipe_and_the_earlier_one_lays_over_it(
    corpus, prepared: Path, tmp_path: Path, run_cli
) -> None:
    earlier = str(ROOT / "configs" / "adamw-cosine.yaml")
    states = {}
    for name, extra in (("recipe", ("--model.overrides", QK_NORM)), ("earlier", ("--config", earlier))):
        result = run_cli(*tiny_fit_args(corpus[0], prepared, tmp_path / name, *extra, "--trainer.max_steps", "3"))
        assert_ok(result)
        checkpoint = tmp_path / name / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
        states[name] = torch.load(checkpoint, weights_only=False)
    recipe, plain = states["recipe"], states["earlier"]
    assert recipe["hyper_parameters"]["attention_mask"] == "causal"  # document masking measured no better
    assert any(name.endswith("blocks.0.attn.q_norm.weight") for name in recipe["state_dict"])
    muon, adamw, _gains = recipe["optimizer_states"][0]["param_groups"]
    assert muon["hidden_matrices"] and muon["initial_lr"] == 0.02 and "momentum" in muon
    assert tuple(adamw["betas"]) == (0.9, 0.99) and adamw["initial_lr"] == 0.002
    assert plain["hyper_parameters"]["overrides"] is None
    assert not any("q_norm" in name for name in plain["state_dict"])
    groups = plain["optimizer_states"][0]["param_groups"]
    assert [tuple(group["betas"]) for group in groups] == [(0.9, 0.95)] * 3 and groups[0]["initial_lr"] == 0.003
