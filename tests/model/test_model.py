import math
from contextlib import nullcontext
from dataclasses import replace
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from pretrain.model.config import PRESETS, LlamaConfig
from pretrain.model.llama import Attention, Llama, apply_rope, rope_cache
from pretrain.model.losses import loss_of_logits, next_token_loss

SMALL = LlamaConfig(vocab_size=100, seq_len=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=64)


def make_model(config: LlamaConfig = SMALL, seed: int = 0) -> Llama:
    model = Llama(config)
    model.init_weights(seed)
    return model


def test_logits_shape_and_padded_vocab() -> None:
    logits = make_model()(torch.randint(0, 100, (3, 17)))
    assert logits.shape == (3, 17, 128)  # 100 rounded up to a multiple of 64


def test_changing_a_future_token_leaves_earlier_logits_unchanged() -> None:
    model = make_model()
    idx = torch.randint(0, 100, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 100
    before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_loss_at_init_is_close_to_uniform() -> None:
    config = LlamaConfig(vocab_size=512, seq_len=64, d_model=64, n_layer=2, n_head=4, n_kv_head=4, ffn_dim=128)
    idx = torch.randint(0, 512, (4, 65))
    logits = make_model(config)(idx[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    assert abs(loss.item() - math.log(config.padded_vocab_size)) < 0.05


def test_rope_matches_complex_rotation() -> None:
    x = torch.randn(2, 3, 10, 8)
    theta = 10_000.0 ** (-torch.arange(0, 8, 2).float() / 8)  # (4,)
    angles = torch.arange(10).float()[:, None] * theta[None, :]  # (T, 4)
    pairs = torch.complex(x[..., :4], x[..., 4:])  # Llama pairs dimension i with i + D/2
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    torch.testing.assert_close(apply_rope(x, rope_cache(10, 8, base=10_000.0)), expected)


def test_rope_keeps_position_zero_and_norms() -> None:
    x = torch.randn(1, 2, 6, 16)
    rotated = apply_rope(x, rope_cache(6, 16, 10_000.0))
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


def naive_attention(module: Attention, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Grouped-query causal attention written out loop by loop, head by head."""
    B, T, _ = x.shape
    H, KV, D = module.n_head, module.n_kv_head, module.head_dim
    wq, wk, wv = module.qkv.weight.split([H * D, KV * D, KV * D])
    q = apply_rope((x @ wq.T).view(B, T, H, D).transpose(1, 2), rope)
    k = apply_rope((x @ wk.T).view(B, T, KV, D).transpose(1, 2), rope)
    v = (x @ wv.T).view(B, T, KV, D).transpose(1, 2)
    heads = []
    for h in range(H):
        kv = h // (H // KV)  # query head h reads key/value head h // group_size
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, kv])
    return torch.cat(heads, dim=-1) @ module.proj.weight.T


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_attention_matches_naive_grouped_query_reference(n_kv_head: int) -> None:
    config = LlamaConfig(vocab_size=64, seq_len=16, d_model=32, n_layer=1, n_head=4, n_kv_head=n_kv_head, ffn_dim=64)
    model = make_model(config)
    attention = model.blocks[0].attn
    x = torch.randn(2, 12, 32)
    rope = model.rope[:12]
    torch.testing.assert_close(attention(x, rope), naive_attention(attention, x, rope))


def test_init_is_deterministic_from_the_seed() -> None:
    a, b, c = make_model(seed=1), make_model(seed=1), make_model(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_init_scales_residual_projections() -> None:
    config = LlamaConfig(vocab_size=64, seq_len=16, d_model=256, n_layer=8, n_head=4, n_kv_head=4, ffn_dim=512)
    model = make_model(config)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for weight in (model.blocks[3].attn.proj.weight, model.blocks[3].mlp.down.weight):
        assert weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.all(model.blocks[0].attn_norm.weight == 1)


def test_tied_embeddings_share_one_tensor() -> None:
    model = make_model(LlamaConfig.from_preset("tiny", tie_embeddings=True, d_model=64, n_head=2, n_kv_head=2))
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize(("preset", "expected"), [("gpt2-124m", 124e6), ("llama-1b", 1.1e9)])
def test_presets_have_their_nominal_size(preset: str, expected: float) -> None:
    with torch.device("meta"):
        model = Llama(PRESETS[preset])
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(expected, rel=0.02)


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="Unknown model preset 'huge'"):
        LlamaConfig.from_preset("huge")
    with pytest.raises(ValueError, match=r"Unknown model field\(s\) \['layers'\]"):
        LlamaConfig.from_preset("tiny", layers=3)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        LlamaConfig(n_head=4, n_kv_head=3)


def test_longer_input_than_seq_len_is_refused() -> None:
    with pytest.raises(ValueError, match="33 tokens exceed seq_len=32"):
        make_model()(torch.zeros(1, 33, dtype=torch.long))


def test_kv_cache_gives_the_same_logits_as_a_full_forward() -> None:
    model = make_model()
    idx = torch.randint(0, 100, (2, 20))
    full = model(idx)
    cache = model.new_cache()
    pieces = [model(idx[:, :7], cache)] + [model(idx[:, t : t + 1], cache) for t in range(7, 17)]
    pieces.append(model(idx[:, 17:], cache))  # several new tokens at once, after a prefix
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="33 tokens exceed"):
        model(torch.zeros(2, 13, dtype=torch.long), cache)


@pytest.mark.parametrize("tied", [False, True])
def test_meta_device_build_then_init_equals_plain_init(tied: bool) -> None:
    """What sharded strategies do: build without memory, allocate, then initialise."""
    config = replace(SMALL, tie_embeddings=tied)
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device="cpu")
    model.init_weights(3)
    plain = make_model(config, seed=3)
    for (name, tensor), expected in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(tensor, expected), name
    torch.testing.assert_close(model.rope, plain.rope)
    assert (model.lm_head.weight is model.embed.weight) == tied  # one tensor, trained as one


def test_activation_checkpointing_keeps_less_and_gives_the_same_loss_and_gradients() -> None:
    idx = torch.randint(0, SMALL.vocab_size, (2, 17))
    results, kept = [], []
    for recompute in (False, True):
        model = make_model(seed=5)
        model.activation_checkpointing = recompute
        saved: list[int] = []

        def pack(tensor: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = next_token_loss(model, idx).ce
        kept.append(sum(saved))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert kept[1] < kept[0] / 2  # the blocks' activations are not kept for backward
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, recomputed in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(plain, recomputed)


def loss_and_kernel_orders(kernel: str | None, recompute: bool = False, compiled: bool = False):
    """The loss, and the kernel first in line (PyTorch's priority order) at each attention call."""
    model = make_model(seed=3)
    model.use_attention_kernel(kernel)
    model.activation_checkpointing = recompute
    loss_fn = torch.compile(next_token_loss, backend="aot_eager") if compiled else next_token_loss
    idx = torch.randint(0, SMALL.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    firsts: list[SDPBackend] = []
    attention = F.scaled_dot_product_attention

    def recording_attention(*args, **kwargs) -> torch.Tensor:
        firsts.append(SDPBackend(torch._C._get_sdp_priority_order()[0]))
        return attention(*args, **kwargs)

    recorded = nullcontext() if compiled else patch.object(F, "scaled_dot_product_attention", recording_attention)
    with recorded:
        loss = loss_fn(model, idx).ce
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    return loss.detach(), firsts


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "checkpointed"])
def test_the_chosen_attention_kernel_comes_first_in_every_attention_call(recompute: bool) -> None:
    default_loss, default_firsts = loss_and_kernel_orders(None, recompute)
    assert default_firsts == [SDPBackend.FLASH_ATTENTION] * len(default_firsts)  # PyTorch's own order
    loss, firsts = loss_and_kernel_orders("cudnn", recompute)
    assert len(firsts) == SMALL.n_layer * (2 if recompute else 1)  # a recomputed block chooses again
    assert firsts == [SDPBackend.CUDNN_ATTENTION] * len(firsts)
    torch.testing.assert_close(loss, default_loss)  # on a CPU cuDNN cannot run: the next kernel does


def test_a_compiled_model_takes_the_attention_kernel_choice() -> None:
    default_loss, _ = loss_and_kernel_orders(None)
    loss, _ = loss_and_kernel_orders("cudnn", compiled=True)
    torch.testing.assert_close(loss, default_loss)


def test_unknown_attention_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        make_model().use_attention_kernel("fast")


def test_the_loss_compiled_apart_from_the_model_gives_the_same_loss_and_gradients() -> None:
    """FSDP2 compiles the blocks one by one and the loss on its own."""
    idx = torch.randint(0, SMALL.vocab_size, (2, 17))
    compiled = torch.compile(loss_of_logits, backend="aot_eager")
    results = []
    for logits_loss in (None, compiled):
        model = make_model(seed=2)
        loss = next_token_loss(model, idx, logits_loss=logits_loss).ce
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for eager, apart in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(eager, apart)
