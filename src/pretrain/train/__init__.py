"""Training: the LightningModule, the optimizers (AdamW groups, Muon) and schedules, the step guard
and loss spikes, held-out metrics, compilation and the parallel wrapping (FSDP2)."""

from pretrain.train.module import PretrainModule
from pretrain.train.muon import MuonWithAdamW
from pretrain.train.parallel import FSDP2Strategy
from pretrain.train.schedules import WarmupCosineLR, WarmupStableDecayLR

__all__ = ["FSDP2Strategy", "MuonWithAdamW", "PretrainModule", "WarmupCosineLR", "WarmupStableDecayLR"]
