"""Multiple-choice accuracy in the training loop, scored as lm-evaluation-harness scores the exported model."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tokenizers import Tokenizer

from pretrain._compat import callback_state_key
from pretrain.callbacks.text_samples import gathered_weights
from pretrain.data.prepare.tokenizer import DocumentBounds, load_tokenizer
from pretrain.data.prepare.tokenizer_files import beginning_id
from pretrain.errors import UserError
from pretrain.evals.scoring import Batch, batch_of, choice_scores, count_correct, scoring_rows, token_loglikelihoods
from pretrain.evals.tasks import Question, read_task

log = logging.getLogger(__name__)
DATA_DIR = "{data_dir}"  # in a task path: the run's data.data_dir, where preparation writes the built-in task


@dataclass
class RankShare:
    """What one rank scores of one task: its questions' rows in batches, and what the counts need."""

    name: str
    questions: int  # in the whole task, over all ranks
    batches: list[Batch]
    calls: int  # forward calls every rank makes (the most any rank needs): sharded models gather in each
    lengths: torch.Tensor  # (Q, C) characters per choice of this rank's questions
    absent: torch.Tensor  # (Q, C) where a question has fewer choices than the task's most
    answers: torch.Tensor  # (Q,)


class MultipleChoice(L.Callback):
    """Accuracy on multiple-choice tasks at every ``every_n_validations``-th validation, and in ``validate``
    and ``test``: logs ``eval/NAME/acc`` and ``eval/NAME/acc_norm``.

    Questions are shared out across ranks and scored in batches on the device; each rank's correct answers
    are counted there and summed across ranks once per task. Task files are read and checked before
    training starts (``pretrain.evals.tasks`` describes the formats).

    Args:
        tasks: ``{NAME: PATH}``; ``{data_dir}`` in a path stands for ``data.data_dir``, e.g.
            ``{data_dir}/evals/next_line.jsonl``, the task preparation writes from the validation documents.
        limit: Score only each file's first ``limit`` questions (lm-evaluation-harness's ``--limit``).
        every_n_validations: Score at every n-th validation of a training run (always in ``validate``).
        batch_size: Rows per forward pass: a row holds a question's choices (sharing their context), or one
            choice where its context had to be cut to the model's length.
    """

    def __init__(
        self, tasks: dict[str, str], limit: int | None = None, every_n_validations: int = 1, batch_size: int = 32
    ) -> None:
        if not tasks:
            raise UserError("MultipleChoice needs at least one task: tasks: {NAME: PATH}.")
        if every_n_validations < 1 or batch_size < 1 or (limit is not None and limit < 1):
            raise UserError("MultipleChoice: every_n_validations, batch_size and limit must be at least 1.")
        self.tasks = tasks
        self.limit = limit
        self.every_n_validations = every_n_validations
        self.batch_size = batch_size
        self.validations = 0  # of the training run, across restarts (saved in checkpoints)
        self.shares: list[RankShare] = []

    @property
    def state_key(self) -> str:
        """Told apart by their tasks: a config may hold more than one (each with its own interval)."""
        return callback_state_key(self, tasks=sorted(self.tasks))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Read, check and tokenize every task (after ``prepare_data``, which writes the built-in one)."""
        datamodule = trainer.datamodule
        tokenizer = load_tokenizer(datamodule.tokenizer_path)
        # An empty context's token: lm-evaluation-harness's beginning of text, as the exported folder sets it.
        bounds = DocumentBounds(datamodule.eos_id, getattr(datamodule, "bos_id", None))
        companions = datamodule.tokenizer_companions() if hasattr(datamodule, "tokenizer_companions") else {}
        prefix = beginning_id(tokenizer, companions, bounds)
        pinned = trainer.strategy.root_device.type == "cuda"
        self.shares = []
        for name, path in self.tasks.items():
            built_in = DATA_DIR in path
            path = self._path(name, path, datamodule)
            questions = read_task(path, self.limit, empty_ok=built_in)
            if not questions:  # the corpus gave none (e.g. a validation split of one document): not a user error
                if trainer.is_global_zero:
                    log.warning(
                        "Task %s: %s holds no questions (too few held-out documents of several lines to "
                        "ask about); it is not scored.",
                        name,
                        path,
                    )
                continue
            self.shares.append(
                self._share(name, str(path), questions, tokenizer, prefix, pl_module.config.seq_len, trainer, pinned)
            )

    @staticmethod
    def _path(name: str, path: str, datamodule: Any) -> Path:
        """``{data_dir}`` replaced by the folder that holds the build here (a remote one's local cache)."""
        if DATA_DIR in path:
            build_dir = getattr(datamodule, "build_dir", None)
            if build_dir is None:
                raise UserError(f"Task {name}: {DATA_DIR} in {path} needs this project's data module; give a path.")
            path = path.replace(DATA_DIR, str(build_dir))
            if not Path(path).is_file():
                raise UserError(
                    f"Task {name}: {path} is not in the build. Preparation writes evals/next_line.jsonl into "
                    "data.data_dir (a remote build needs it uploaded with the rest); name a file that is there."
                )
        return Path(path)

    def _share(
        self,
        name: str,
        source: str,
        questions: list[Question],
        tokenizer: Tokenizer,
        prefix: int,
        max_length: int,
        trainer: L.Trainer,
        pinned: bool,
    ) -> RankShare:
        """This rank's questions (every ``world``-th), tokenized with all the others so that a bad one stops
        every rank alike. ``pinned``: host tensors in page-locked memory, copied to the GPU without waiting."""
        host = torch.Tensor.pin_memory if pinned else lambda tensor: tensor
        world, rank = trainer.world_size, trainer.global_rank
        every_row = scoring_rows(questions, tokenizer, max_length, prefix, source)
        rows = [row for row in every_row if row.question % world == rank]
        mine = questions[rank::world]  # question q is this rank's (q // world)-th
        most_rows = max(sum(row.question % world == r for row in every_row) for r in range(world))
        widest = max(len(q.continuations) for q in questions)
        lengths = torch.ones(len(mine), widest, dtype=torch.float64)
        absent = torch.ones(len(mine), widest, dtype=torch.bool)
        for number, question in enumerate(mine):
            lengths[number, : len(question.lengths)] = torch.tensor(question.lengths, dtype=torch.float64)
            absent[number, : len(question.lengths)] = False
        batches = []
        for start in range(0, len(rows), self.batch_size):
            batch = batch_of(rows[start : start + self.batch_size])
            batch.places[:, 0] //= world  # question q is this rank's (q // world)-th
            batches.append(batch.apply(host))
        answers = torch.tensor([q.answer for q in mine], dtype=torch.long)
        calls = math.ceil(most_rows / self.batch_size)
        return RankShare(name, len(questions), batches, calls, host(lengths), host(absent), host(answers))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            self.validations += 1
            if self.validations % self.every_n_validations:
                return
        self.score(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.score(trainer, pl_module)

    def score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log every task's accuracies, summed across ranks (one reduction per task)."""
        for share in self.shares:
            counts = trainer.strategy.reduce(self.correct(share, trainer, pl_module), reduce_op="sum")
            accuracy = counts.double() / share.questions
            pl_module.log_dict({f"eval/{share.name}/acc": accuracy[0], f"eval/{share.name}/acc_norm": accuracy[1]})

    def correct(self, share: RankShare, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        """``[acc, acc_norm]`` counts of this rank's questions, on the device (nothing read back here)."""
        device = pl_module.device
        scores = torch.zeros(tuple(share.lengths.shape), device=device)
        model = pl_module.model
        # Shapes change with every batch: run eagerly rather than compile each one.
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), gathered_weights(trainer.strategy.model):
            for call in range(share.calls):
                if call >= len(share.batches):  # this rank has run out: a token through, for the ranks that gather
                    model(torch.zeros(1, 1, dtype=torch.long, device=device))
                    continue
                batch = share.batches[call].apply(lambda tensor: tensor.to(device, non_blocking=True))
                with trainer.precision_plugin.forward_context():
                    choice_scores(token_loglikelihoods(model, batch), batch.places, scores)
        lengths, absent, answers = (
            tensor.to(device, non_blocking=True) for tensor in (share.lengths, share.absent, share.answers)
        )
        return count_correct(scores.masked_fill_(absent, float("-inf")), lengths, answers)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict.get("validations", 0)
