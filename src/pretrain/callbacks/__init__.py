"""What a run shows while it trains: text samples, the progress bar, tokens/s and MFU, the TensorBoard
logger and the run review (the HPARAMS row, the curves by tokens)."""

from pretrain.callbacks.progress_bar import LossProgressBar
from pretrain.callbacks.run_logger import RunLogger
from pretrain.callbacks.text_samples import TextSamples
from pretrain.callbacks.throughput import Throughput

__all__ = ["LossProgressBar", "RunLogger", "TextSamples", "Throughput"]
