"""FSDP on two CPU processes. FSDP2 (pretrain.train.parallel): sharded creation, training, exact resume, reading
back, Muon's steps. FSDP1 (Lightning's FSDPStrategy): the optimizer's groups, text samples, starting weights."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import FSDPStrategy
from tokenizers import Tokenizer
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, _init_utils
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import distribute_tensor

from pretrain.callbacks.text_samples import TextSamples
from pretrain.checkpointing.loading import load_checkpoint, load_model
from pretrain.model.config import LlamaConfig
from pretrain.model.llama import Block, Llama, build_model
from pretrain.train.module import PretrainModule
from pretrain.train.muon import MuonWithAdamW
from pretrain.train.parallel import build_sharded_model
from pretrain.train.param_groups import param_groups
from tests.helpers.runs import ROOT, TINY_VOCAB, assert_ok, scalars_by_step, tiny_fit_args

CONFIG = LlamaConfig(
    vocab_size=300, seq_len=32, d_model=48, n_layer=3, n_head=4, n_kv_head=2, ffn_dim=96, tie_embeddings=True
)
FSDP2 = (
    "--trainer.strategy",
    '{"class_path": "pretrain.train.FSDP2Strategy"}',
    "--trainer.devices",
    "2",
    "--model.activation_checkpointing",
    "true",
)


def close_process_group() -> None:
    """Wait for every rank's collectives before tearing the group down: gloo aborts the process
    ("terminate called without an active exception") when one rank destroys it while FSDP's last
    collective still runs on another."""
    dist.barrier()
    dist.destroy_process_group()


def on_two_ranks(target, tmp_path: Path) -> object:
    """Run ``target(rank, rendezvous, out)`` in two gloo processes; what rank 0 saved to ``out``."""
    out = tmp_path / "out.pt"
    mp.spawn(target, args=(str(tmp_path / "rendezvous"), str(out)), nprocs=2)
    return torch.load(out)


def save_full_state(model: torch.nn.Module, rank: int, out: str) -> None:
    """The sharded model's whole state, gathered on every rank and saved by rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, out)


def _build_on_rank(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model = build_sharded_model(CONFIG, init_device_mesh("cpu", (2,)), torch.device("cpu"), seed=3)
        assert all(p.to_local().numel() < p.numel() for p in model.parameters() if p.dim() == 2)  # really sharded
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"weights": full, "rope": model.rope}, out)
    finally:
        close_process_group()


def test_sharded_creation_gives_the_single_device_weights(tmp_path: Path) -> None:
    """Built on the meta device, sharded over two ranks, initialised in place: the same weights as one device."""
    sharded = on_two_ranks(_build_on_rank, tmp_path)
    plain = Llama(CONFIG)
    plain.init_weights(3)
    assert sharded["weights"].keys() == plain.state_dict().keys()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(sharded["weights"][name], tensor), name
    torch.testing.assert_close(sharded["rope"], plain.rope)


def _load_on_rank(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        source = Llama(CONFIG)
        source.init_weights(7)
        weights = source.state_dict() if rank == 0 else {}  # as init_from reads them: on rank 0 alone
        model = build_sharded_model(CONFIG, init_device_mesh("cpu", (2,)), torch.device("cpu"), seed=3, weights=weights)
        save_full_state(model, rank, out)
    finally:
        close_process_group()


def test_weights_read_on_rank_0_alone_reach_every_shard(tmp_path: Path) -> None:
    loaded = on_two_ranks(_load_on_rank, tmp_path)
    source = Llama(CONFIG)
    source.init_weights(7)
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def _rope_dtypes_on_rank(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model = build_sharded_model(
            CONFIG, init_device_mesh("cpu", (2,)), torch.device("cpu"), seed=3, param_dtype=torch.bfloat16
        )
        seen = []
        for block in model.blocks:
            block.attn.register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, args[1].dtype)))
        model(torch.randint(0, CONFIG.vocab_size, (2, 16))).float().sum().backward()
        if rank == 0:
            torch.save(seen, out)
    finally:
        close_process_group()


def test_bf16_weights_leave_the_rotary_table_in_fp32(tmp_path: Path) -> None:
    assert (
        on_two_ranks(_rope_dtypes_on_rank, tmp_path) == [(torch.bfloat16, torch.float32)] * CONFIG.n_layer
    )  # activations bf16, table fp32


def run_fsdp2(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_fsdp2_trains_resumes_exactly_and_its_sharded_checkpoint_reads_back(corpus, prepared: Path, tmp_path: Path):
    steps = (
        "--model.lr_scheduler.init_args.max_steps",
        "16",
        "--model.lr_scheduler.init_args.warmup_steps",
        "4",
        "--checkpoint.every_n_train_steps",
        "8",
    )
    whole = run_fsdp2(
        *tiny_fit_args(corpus[0], prepared, tmp_path / "whole", *FSDP2, *steps, "--trainer.max_steps", "16")
    )
    assert_ok(whole)
    halves = tmp_path / "halves"
    for max_steps, resume in (("8", ()), ("16", ("--ckpt_path", "last"))):
        half = run_fsdp2(
            *tiny_fit_args(corpus[0], prepared, halves, *FSDP2, *steps, "--trainer.max_steps", max_steps, *resume)
        )
        assert_ok(half)
    reference = scalars_by_step(tmp_path / "whole" / "quickstart" / "version_0", "train/loss")
    assert len(reference) == 16
    assert scalars_by_step(halves / "quickstart" / "version_0", "train/loss") == reference

    # Saved in the background (torch.distributed.checkpoint.async_save), then resumed: the same losses.
    background = tmp_path / "background"
    for max_steps, resume in (("8", ()), ("16", ("--ckpt_path", "last"))):
        args = (*steps, "--trainer.max_steps", max_steps, "--checkpoint.async_save", "true", *resume)
        assert_ok(run_fsdp2(*tiny_fit_args(corpus[0], prepared, background, *FSDP2, *args)))
    assert scalars_by_step(background / "quickstart" / "version_0", "train/loss") == reference
    assert sorted(path.name for path in (background / "quickstart" / "version_0" / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step=0000016.ckpt",
    ]

    # Compiled (each block, and the loss apart): the same training, up to the order of float operations.
    compiled = run_fsdp2(
        *tiny_fit_args(
            corpus[0],
            prepared,
            tmp_path / "compiled",
            *FSDP2,
            *steps,
            "--trainer.max_steps",
            "6",
            "--model.compile",
            "true",
        )
    )
    assert_ok(compiled)
    compiled_losses = scalars_by_step(tmp_path / "compiled" / "quickstart" / "version_0", "train/loss")
    assert compiled_losses == pytest.approx({step: reference[step] for step in range(6)}, rel=1e-4)

    checkpoint = halves / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert (checkpoint.resolve() / ".metadata").is_file()  # a folder of shards, one file per rank
    saved = sorted(path.name for path in checkpoint.parent.iterdir())  # committed whole, by a rename
    assert saved == ["last.ckpt", "step=0000016.ckpt"]  # the quickstart's save_top_k: 1
    assert (checkpoint.resolve() / "meta.pt").is_file()
    consolidated = load_checkpoint(checkpoint)
    assert consolidated["global_step"] == 16
    assert load_model(consolidated)(torch.zeros(1, 4, dtype=torch.long)).isfinite().all()


def _fsdp1_groups_on_rank(rank: int, rendezvous: str, out: str) -> None:
    """Wrapped as Lightning's FSDPStrategy does (one unit per block, use_orig_params), then grouped."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model = Llama(CONFIG)
        wrapped = FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True, device_id=torch.device("cpu")
        )
        names = {id(p): n.replace("_fsdp_wrapped_module.", "") for n, p in wrapped.named_parameters()}
        assert all(p.dim() == 1 for p in wrapped.parameters())  # what the optimizer is built over
        if rank == 0:
            torch.save([sorted(names[id(p)] for p in group["params"]) for group in param_groups(model)], out)
    finally:
        close_process_group()


def test_weight_decay_groups_are_the_same_when_fsdp1_has_flattened_the_parameters(tmp_path: Path) -> None:
    groups = on_two_ranks(_fsdp1_groups_on_rank, tmp_path)
    plain = Llama(CONFIG)
    names = {id(p): n for n, p in plain.named_parameters()}
    expected = [sorted(names[id(p)] for p in group["params"]) for group in param_groups(plain)]
    assert groups == expected
    assert all("norm" in name for name in expected[2]) and expected[2]  # only the gains are exempt


def gradient(index: int, shape: torch.Size, step: int) -> torch.Tensor:
    """The same gradient for a parameter (by its place in ``named_parameters``) on every rank and in one process."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + index))


def _muon_steps_on_rank(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model = build_sharded_model(CONFIG, init_device_mesh("cpu", (2,)), torch.device("cpu"), seed=3)
        optimizer = MuonWithAdamW(param_groups(model), fused=True)
        for step in range(2):
            for index, param in enumerate(model.parameters()):
                param.grad = distribute_tensor(gradient(index, param.shape, step), param.device_mesh, param.placements)
            optimizer.step()
        save_full_state(model, rank, out)
    finally:
        close_process_group()


def test_muon_steps_fsdp2_shards_as_one_device_steps_whole_matrices(tmp_path: Path) -> None:
    """Each rank orthogonalises the gathered matrix and keeps its rows: the single-device weights."""
    sharded = on_two_ranks(_muon_steps_on_rank, tmp_path)
    model = build_model(CONFIG, "cpu", seed=3)
    optimizer = MuonWithAdamW(param_groups(model), fused=True)
    for step in range(2):
        for index, param in enumerate(model.parameters()):
            param.grad = gradient(index, param.shape, step)
        optimizer.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(sharded[name], value, msg=name)


def _fsdp1_samples_on_rank(rank: int, rendezvous: str, tokenizer: str, out: str) -> None:
    """The text-samples callback on a LightningModule wrapped as Lightning's FSDPStrategy wraps it."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        module = fsdp1_test_module()
        wrapped = FullyShardedDataParallel(
            module, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True, device_id=torch.device("cpu")
        )
        wrapped(torch.randint(0, TINY_VOCAB, (2, 16))).sum().backward()  # a training step's forward and backward
        callback = TextSamples(prompts=["def ", "import "], max_new_tokens=6)
        callback.tokenizer = Tokenizer.from_file(tokenizer)
        samples = callback.samples(SimpleNamespace(strategy=SimpleNamespace(model=wrapped)), module)
        torch.save(samples, f"{out}.{rank}")
    finally:
        close_process_group()


def fsdp1_test_module() -> PretrainModule:
    module = PretrainModule(
        overrides={"d_model": 32, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "ffn_dim": 64},
        vocab_size=TINY_VOCAB,
        seq_len=16,
    )
    module.configure_model()
    return module


def test_text_samples_gather_the_weights_fsdp1_shards(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # the same weights in every process
    tokenizer = str(prepared / "tokenizer.json")
    out = str(tmp_path / "samples")
    mp.spawn(_fsdp1_samples_on_rank, args=(str(tmp_path / "rendezvous"), tokenizer, out), nprocs=2)
    callback = TextSamples(prompts=["def ", "import "], max_new_tokens=6)
    callback.tokenizer = Tokenizer.from_file(tokenizer)
    module = fsdp1_test_module()
    expected = callback.samples(SimpleNamespace(strategy=SimpleNamespace(model=module)), module)
    assert torch.load(f"{out}.0") == torch.load(f"{out}.1") == expected


def _fsdp1_init_from_on_rank(rank: int, rendezvous: str, out: str) -> None:
    """A run's module under Lightning's FSDPStrategy, started from a Hugging Face folder and wrapped with the
    strategy's FSDP settings (as its ``_setup_model`` does, but on the CPU); what each rank held before the wrap,
    and the whole model after it."""
    from tests.helpers import hf_models

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    # FSDP1 broadcasts rank 0's values from GPU memory only (NCCL): lifting that guard runs the same broadcast on gloo.
    _init_utils._check_module_states_for_sync_module_states = lambda states: None
    try:
        strategy = FSDPStrategy(auto_wrap_policy={Block}, parallel_devices=[torch.device("cpu")] * 2)
        trainer = SimpleNamespace(strategy=strategy, world_size=2, is_global_zero=rank == 0)
        module = PretrainModule(vocab_size=hf_models.VOCAB, seq_len=hf_models.SEQ_LEN, init_from=str(Path(out).parent))
        module._trainer = trainer
        module.configure_model()
        before = {name: tensor.device.type for name, tensor in module.model.state_dict().items()}
        wrapped = FullyShardedDataParallel(
            module, sharding_strategy=strategy.sharding_strategy, device_id=torch.device("cpu"), **strategy.kwargs
        )
        with torch.device("meta"):
            whole_size = sum(p.numel() for p in Llama(module.config).parameters())
        assert sum(p.numel() for p in wrapped.parameters()) < whole_size  # each rank keeps its shard only
        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            whole = {name: tensor.clone() for name, tensor in module.model.state_dict().items()}
        tied = module.model.lm_head.weight is module.model.embed.weight
        torch.save({"before": before, "whole": whole, "tied": tied}, f"{out}.{rank}")
    finally:
        close_process_group()


def test_fsdp1_reads_starting_weights_on_rank_0_alone_and_every_rank_gets_them(tmp_path: Path) -> None:
    """Only rank 0 builds the whole model (the other stays on the meta device until FSDP1 wraps each unit): a large
    model's start is one copy per node, not one per GPU."""
    hf_models = pytest.importorskip("tests.helpers.hf_models")
    folder = hf_models.save_qwen3(tmp_path)  # a tied head: the tie survives the meta device
    out = str(tmp_path / "out.pt")
    mp.spawn(_fsdp1_init_from_on_rank, args=(str(tmp_path / "rendezvous"), out), nprocs=2)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert set(ranks[0]["before"].values()) == {"cpu"} and set(ranks[1]["before"].values()) == {"meta"}
    module = PretrainModule(vocab_size=hf_models.VOCAB, seq_len=hf_models.SEQ_LEN, init_from=str(folder))
    module.configure_model()  # in one process: the weights as read from the folder
    for rank in ranks:
        assert rank["tied"]
        for name, tensor in module.model.state_dict().items():
            assert torch.equal(rank["whole"][name], tensor), name
