"""The SGLang client package: server config (`config.py`, torch-free), request/response bodies
checked against SGLang's request classes (`payloads.py`), and launching / attaching to servers
plus the HTTP client with retries and failover (`client.py`).

Used by the rollout engine (`spark_mcore.rollout.sglang_engine`) and by the weight sync
(`spark_mcore.weights`); those two never import each other. Import the submodules directly:
this init imports nothing so that `spark_mcore.sglang.config` stays cheap."""
