"""Prompt data: the builtin `arith` task (arith.py), the small built-in tokenizer (tokenizer.py),
chat formatting (chat.py), validated user datasets (jsonl.py) and prompt sources plus the
resumable batch loader (dataset.py). Import the submodules directly; this package imports
nothing so that `spark_mcore.data.config` stays cheap to import."""
