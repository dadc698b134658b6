"""Is the model good at anything yet: multiple-choice tasks scored in the training loop as lm-evaluation-harness
scores them (callback, scoring, tasks). The next-line task preparation writes from any corpus is in
``pretrain.data.prepare.next_line``."""

from pretrain.evals.callback import MultipleChoice

__all__ = ["MultipleChoice"]
