"""Raw text -> tokenizer + token shards + manifest: sources and readers, the plan and buckets, the
tokenizer, the build and its lock, mixtures, the next-line task, and the checks of a finished build."""
