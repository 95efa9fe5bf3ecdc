"""SGLangEngine: the RolloutEngine protocol over SGLang servers (spark_mcore.sglang.client).

It launches the servers unless `config.urls` names running ones, and generates through the
client (retries, failover across servers). Weights reach the servers through the weight sync
of spark_mcore.weights, wired by spark_mcore.engines; the engine only records the version.
"""

from __future__ import annotations

from collections.abc import Sequence

from spark_mcore.config.loader import ConfigError
from spark_mcore.data.images import portable_ref
from spark_mcore.sglang.checks import check_servers
from spark_mcore.sglang.client import ServerHandle, SGLangClient, attach_servers, launch_servers
from spark_mcore.sglang.config import SGLangConfig, launch_extra_args
from spark_mcore.types import Completion, SamplingParams


class SGLangEngine:
    """RolloutEngine over SGLang servers. Launches them unless `config.urls` names running ones."""

    takes_image_refs = True  # generate(..., image_data=[[image reference, ...] per prompt])

    def __init__(self, config: SGLangConfig, handles: Sequence[ServerHandle] | None = None) -> None:
        self.config = config
        self.policy_version = 0
        self._owned: list[ServerHandle] = []
        self._given_handles = handles is not None  # the caller's servers: not ours to check
        if handles is None:
            if not config.urls and not config.model_path:
                raise ConfigError("sglang.model_path: required to launch servers (or set sglang.urls to attach)")
            if config.urls:
                handles = attach_servers(config.urls)
            else:
                handles = self._owned = launch_servers(
                    config.num_servers, config.model_path, config.base_port, launch_extra_args(config),
                    config.log_dir, config.launch_command, config.host, config.port_stride, config.gpus_per_server,
                    python=config.python or None, first_gpu=config.first_gpu)
            try:
                for h in handles:
                    h.wait_healthy(config.startup_timeout_s, config.health_path)
            except BaseException:
                self.shutdown()
                raise
        self.client = SGLangClient(handles, config)
        if config.check_server_info and not self._given_handles:
            try:  # what the servers run must match what the weight-update group assumes
                check_servers(self.client.server_info(), config.gpus_per_server)
            except BaseException:
                self.shutdown()
                raise

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                 image_data: Sequence[list[str]] | None = None) -> list[list[Completion]]:
        """`image_data[i]`: the image references (paths, data URIs, URLs) of prompt i for
        vision-language models, whose ids hold the expanded image pads (the server's image
        processor, set by the export's preprocessor_config.json, gives the same count). Local
        files travel as data URIs: a server need not share the trainer's filesystem."""
        if image_data is not None:
            image_data = [[portable_ref(ref) for ref in refs] for refs in image_data]
        return self.client.generate(prompt_ids, params, image_data)

    def shutdown(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        for h in self._owned:
            h.terminate()


__all__ = ["SGLangEngine"]
