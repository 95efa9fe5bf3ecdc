"""Hugging Face (safetensors) -> Megatron dist checkpoint; same as `spark-mcore convert hf-to-mcore`.

    python tools/convert_hf_to_mcore.py --hf Qwen2.5-7B-Instruct --out runs/q7b --tp 2 --pp 2

writes runs/q7b/checkpoints/step_0/{model/, meta.json, hf/}. With tp*pp > 1 it starts tp*pp
CPU processes, each holding only its own shard (see spark_mcore/checkpoint/convert.py).
"""

from __future__ import annotations

import sys

from spark_mcore.cli import main

if __name__ == "__main__":  # required: conversion ranks are started with the spawn method
    sys.exit(main(["convert", "hf-to-mcore", *sys.argv[1:]]))
