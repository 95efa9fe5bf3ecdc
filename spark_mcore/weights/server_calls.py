"""Weight-update HTTP calls to every live SGLang server (or CPU twin) of an SGLangClient.

`SGLangClient` offers pause/continue/flush and a per-tensor update call; the bucketed sync
needs a few more bodies (load_format="flattened_bucket", /begin_weight_update,
/end_weight_update, /update_weights_from_tensor with a load_format), so they are sent from
here with the client's servers, retry policy and error reporting (log tails).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from spark_mcore.sglang import payloads as P
from spark_mcore.sglang.client import (
    PendingCalls,
    ServerHandle,
    SGLangClient,
    SGLangError,
    SGLangRequestError,
    http_json,
    with_retries,
)
from spark_mcore.weights.bucket import BucketHeader

BodyFor = Callable[[int, ServerHandle], dict[str, Any] | None]


class ServerCalls:
    """Fans control calls out to `client.live()` servers in background threads."""

    def __init__(self, client: SGLangClient, max_workers: int | None = None) -> None:
        self.client = client
        # A bucketed sync keeps two update requests per server open (bucket k awaiting its
        # answer, k+1 queued behind it): two workers per server keep k+1 from waiting for a thread.
        workers = max_workers if max_workers is not None else 2 * len(client.handles) + 2
        self._pool = ThreadPoolExecutor(max_workers=max(2, workers), thread_name_prefix="weight-sync-http")

    def post(self, path: str, body_for: BodyFor, retry: bool = True
             ) -> tuple[PendingCalls, list[tuple[ServerHandle, Future]]]:
        """Starts `path` on every live server; returns (PendingCalls for .wait(), (server, future)s).

        retry=False for requests that must not be repeated: a re-sent weight update would make
        the server wait for a broadcast the trainer never repeats.
        """
        live = self.client.live()
        if not live:
            raise SGLangError(f"{path}: no live rollout server:\n" + "\n".join(self.client.dead.values()))
        cfg = self.client.config

        def one(k: int, h: ServerHandle) -> Any:
            res = with_retries(lambda: http_json(h.url, path, body_for(k, h), cfg.control_timeout_s),
                               cfg.max_retries if retry else 0, cfg.backoff_s, cfg.max_backoff_s,
                               give_up=lambda: not h.alive())
            if isinstance(res, dict) and res.get("success") is False:
                raise SGLangRequestError(f"{path} failed: {res.get('message')}")
            return res

        futures = [(h, self._pool.submit(one, k, h)) for k, h in enumerate(live)]
        return PendingCalls(futures), futures

    def call(self, path: str, body: dict[str, Any] | None = None) -> list[Any]:
        """Same body to every live server; waits for all answers."""
        return self.post(path, lambda k, h: body)[0].wait()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def distributed_update_body(header: BucketHeader, group_name: str, version: int | None,
                            flattened: bool) -> dict[str, Any]:
    """UpdateWeightsFromDistributedReqInput for one bucket: names/dtypes/shapes describe the
    tensors inside it, in bucket order. flattened=True adds load_format="flattened_bucket"
    (one uint8 broadcast of the whole bucket); False is SGLang's per-tensor protocol."""
    names, dtypes, shapes = header.sglang_lists()
    body = P.build_update_weights_from_distributed_payload(
        names, dtypes, shapes, group_name, None if version is None else str(version), flush_cache=False)
    if flattened:
        body["load_format"] = "flattened_bucket"
    return body


def tensor_update_body(blobs: Sequence[bytes], version: int | None) -> dict[str, Any]:
    """UpdateWeightsFromTensorReqInput carrying one serialized flattened bucket per server TP rank."""
    return P.build_update_weights_from_tensor_payload(blobs, None if version is None else str(version),
                                                      flush_cache=False, load_format="flattened_bucket")


__all__ = ["ServerCalls", "distributed_update_body", "tensor_update_body"]
