"""Draw a run's loss and accuracy curves from its TensorBoard events into a PNG (the picture in the README).

    python scripts/plot_curves.py logs/quickstart/version_0 docs/quickstart-curves.png

Reads ``train/loss``, ``val/loss``, every ``eval/<task>/acc`` and ``acc_norm``, and ``train/lr`` from the run
folder; needs matplotlib (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import matplotlib
except ModuleNotFoundError:
    print('error: plot_curves.py needs matplotlib (training does not): pip install -e ".[dev]"', file=sys.stderr)
    raise SystemExit(2) from None

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def series(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    by_step = {event.step: event.value for event in events.Scalars(tag)}  # a resumed step: its last value
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def plot(run_dir: Path, out: Path) -> None:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    figure, (loss_axis, eval_axis, lr_axis) = plt.subplots(
        3, 1, figsize=(8, 7.5), sharex=True, height_ratios=[3, 1.6, 1]
    )
    loss_axis.plot(*series(events, "train/loss"), label="train/loss (per step)", linewidth=0.8, alpha=0.8)
    val_steps, val_losses = series(events, "val/loss")
    loss_axis.plot(val_steps, val_losses, "o-", label="val/loss (held-out documents)", linewidth=2)
    for step, loss in zip(val_steps, val_losses, strict=True):
        loss_axis.annotate(f"{loss:.3f}", (step, loss), textcoords="offset points", xytext=(0, 8), ha="center")
    loss_axis.set_ylabel("cross-entropy (nats per token)")
    loss_axis.set_title(f"{run_dir.parent.name}/{run_dir.name}")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    plot_accuracies(events, eval_axis)
    lr_axis.plot(*series(events, "train/lr"), color="tab:gray")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    lr_axis.grid(alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def plot_accuracies(events: EventAccumulator, axis: plt.Axes) -> None:
    """Each multiple-choice task's accuracies at the validations, against chance with four choices."""
    for tag in sorted(t for t in events.Tags()["scalars"] if t.startswith("eval/")):
        steps, values = series(events, tag)
        axis.plot(steps, values, "o-" if tag.endswith("/acc") else "s--", label=tag)
        for step, value in zip(steps, values, strict=True):
            axis.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(-14, 6), fontsize=8)
    axis.axhline(0.25, color="tab:red", linewidth=0.8, linestyle=":", label="chance (4 choices)")
    axis.set_ylim(bottom=0.2, top=max(0.3, axis.get_ylim()[1] + 0.02))
    axis.set_ylabel("accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder, e.g. logs/quickstart/version_0")
    parser.add_argument("out", type=Path, help="the PNG to write")
    options = parser.parse_args()
    plot(options.run_dir, options.out)
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
