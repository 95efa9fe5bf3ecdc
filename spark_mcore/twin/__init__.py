"""The CPU twin of SGLang: an SGLang-compatible rollout server on the transformers engine.

Where SGLang does not run (a CPU machine, CI), this program stands in for it: the same native
endpoints (/generate, /pause_generation, /continue_generation, /flush_cache,
/init_weights_update_group, /update_weights_from_distributed, /begin_weight_update, ...),
the same bucketed weight-update protocol over gloo, started the way users start SGLang:

    python -m spark_mcore.twin --model HF_DIR --port 30000        # then point sglang.urls at it

or launched by a run with `sglang.launch_command` set to `TWIN_SERVER_COMMAND` (server.py).

    app.py       state and request handlers (what is and is not like SGLang 0.5.23)
    server.py    the threaded HTTP server and the command line
    receiver.py  the receiving side of a bucket broadcast (receive_bucket, load_into)
"""
