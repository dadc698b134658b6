"""Checkpoints: atomic saves, preemption, which one ``last`` resumes, random states, and reading a
finished run back (``loading``, ``sharded``; these two import neither Lightning nor litdata)."""
