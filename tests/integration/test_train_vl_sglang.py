"""`examples/configs/tiny_vl.yaml` with rollout.engine=sglang against a launched CPU twin
(world size 1): the HF init export carries preprocessor_config.json, every generate request
carries its prompt's image (policy, judge and reflection prompts alike) as SGLang's
`image_data`, the twin processes it (it refuses image pads without images, and a pad count
that is not the processed images'), and the loop runs policy and reward steps."""

from pathlib import Path
from typing import Any

import pytest
import torch

import spark_mcore.sglang.payloads as payloads
from spark_mcore.config.run import load_run_config
from spark_mcore.data.images import DATA_URI, processing_from_dir
from spark_mcore.train import train
from spark_mcore.twin.server import TWIN_SERVER_COMMAND

pytestmark = pytest.mark.slow  # ~30 s of CPU: a trainer and a twin server, 3 steps

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_vl.yaml"
OVERRIDES = ["rollout.engine=sglang", "sglang.num_servers=1", "sglang.base_port=0", "sglang.startup_timeout_s=120",
             "weights.wire_dtype=fp32", "weights.timeout_s=60", "trainer.steps=2", "data.test_size=2",
             "rollout.max_new_tokens=6", "eval.max_new_tokens=4", "logging.progress=false",
             "logging.tensorboard=false", "checkpoint.export_hf=false"]


def test_tiny_vl_through_the_twin_server(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_run_config(str(CONFIG), [*OVERRIDES, f"checkpoint.dir={tmp_path}"])
    cfg.sglang.launch_command = list(TWIN_SERVER_COMMAND)
    cfg.sglang.extra_args = ["--threads", "1"]
    sent: list[tuple[int, list[list[str]]]] = []  # (requests, image_data) of each generate payload
    build = payloads.build_generate_payload

    def spy_build(requests: Any, *args: Any, **kwargs: Any) -> Any:
        body = build(requests, *args, **kwargs)
        sent.append((len(requests), body.get("image_data", [])))
        return body

    monkeypatch.setattr(payloads, "build_generate_payload", spy_build)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trainer shares the cores with the twin (2 threads each: 10-20x slower steps)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)

    out = capsys.readouterr().out
    assert "[policy step 1, policy 1/2]" in out and "[reward step 2, policy 1/2]" in out
    assert "[policy step 3, policy 2/2]" in out
    assert processing_from_dir(tmp_path / "hf_init").max_pixels == cfg.data.image_max_pixels
    assert sent and sum(n for n, _ in sent) == 2 + 16 + 8 + 16 + 2  # eval, policy, reward (2 x 4), policy, eval
    for n, image_data in sent:  # one image per request, as a data URI the server can decode anywhere
        assert len(image_data) == n and all(len(refs) == 1 and DATA_URI.match(refs[0]) for refs in image_data)
