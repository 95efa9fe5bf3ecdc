"""Same as `spark-mcore plan`: memory per GPU, step time and the smallest feasible layouts.

    python tools/plan_parallelism.py --preset qwen2.5-vl-32b --gpus 32 --gpu-mem 80
"""

from __future__ import annotations

import sys

from spark_mcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
