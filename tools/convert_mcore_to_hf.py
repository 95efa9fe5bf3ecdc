"""Megatron dist checkpoint (any TP/PP) -> Hugging Face safetensors; same as
`spark-mcore convert mcore-to-hf`.

    python tools/convert_mcore_to_hf.py --mcore runs/q7b --out q7b-hf --dtype bf16

--mcore takes a step directory (meta.json + model/) or a run directory (its newest step).
Tensors are streamed layer by layer into safetensors files of at most --max-shard-gb.
"""

from __future__ import annotations

import sys

from spark_mcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "mcore-to-hf", *sys.argv[1:]]))
