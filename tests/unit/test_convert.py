"""HF <-> Megatron conversion at TP1 (in-process): bitwise round trips, logits parity with
transformers, the trainer's checkpoint layout, and the error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import spark_mcore.config  # noqa: F401  (before component configs)
from spark_mcore.checkpoint.convert import (
    ConversionError,
    check_layout,
    convert_hf_to_mcore,
    convert_mcore_to_hf,
    fill_model_from_hf,
    finish_hf_to_mcore,
    plan_hf_to_mcore,
    run_hf_to_mcore_jobs,
)
from spark_mcore.checkpoint.hf_io import SafetensorsReader
from spark_mcore.cli import main
from spark_mcore.models.config import ModelConfig

VOCAB = 64


def make_hf_model(path: Path, tied: bool, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny random Qwen2ForCausalLM saved to `path` (every tensor random, biases included);
    returns its state dict as saved."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    model.to(dtype).save_pretrained(path)
    return {k: v.clone() for k, v in load_file(path / "model.safetensors").items()}


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as r:
        return {n: r.get(n) for n in r.names()}


def megatron_logits(step_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Load a converted step dir into a TP1 megatron model the way the trainer does
    (checkpoint/io.py load_model_weights) and return logits [B, T, V]."""
    from megatron.core import dist_checkpointing

    from spark_mcore.distributed.config import ParallelConfig
    from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
    from spark_mcore.models.registry import get_adapter

    meta = json.loads((step_dir / "meta.json").read_text())
    cfg = ModelConfig(**meta["model"])
    init_distributed(ParallelConfig(backend="gloo"), seed=5)
    try:
        adapter = get_adapter("qwen2", cfg)
        model = adapter.build_model(cfg, meta["vocab_size"])
        state = dist_checkpointing.load(model.sharded_state_dict(prefix=""), str(step_dir / "model"))
        ref = dist_checkpointing.load(model.sharded_state_dict(prefix=""), str(step_dir / "ref"))
        assert ref.keys() == state.keys()
        assert all(torch.equal(ref[k], v) for k, v in state.items() if isinstance(v, torch.Tensor))
        model.load_state_dict(state)  # strict, as the trainer's load_actor_state
        with torch.no_grad():
            return adapter.forward(model.eval(), tokens)
    finally:
        destroy_distributed()


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[Path, Path, dict]]:
    """{tied: (hf_dir, step_dir, original state)}; both converted in one in-process run."""
    root = tmp_path_factory.mktemp("convert_tp1")
    states = {tied: make_hf_model(root / f"hf_{tied}", tied, seed=int(tied)) for tied in (True, False)}
    jobs = {tied: plan_hf_to_mcore(root / f"hf_{tied}", root / f"run_{tied}", progress=False)
            for tied in (True, False)}
    run_hf_to_mcore_jobs(list(jobs.values()))
    return {tied: (root / f"hf_{tied}", finish_hf_to_mcore(job), states[tied])
            for tied, job in jobs.items()}


@pytest.mark.parametrize("tied", [True, False])
def test_roundtrip_tp1_is_bitwise(converted: dict, tmp_path: Path, tied: bool) -> None:
    _, step_dir, original = converted[tied]
    out = convert_mcore_to_hf(step_dir, tmp_path / "hf", progress=False)
    back = hf_state(out)
    assert ("lm_head.weight" in back) is (not tied)
    assert sorted(back) == sorted(original) and len(back) == 4 * 12 + 2 + (0 if tied else 1)
    for name, t in original.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], t), name


@pytest.mark.parametrize("tied", [True, False])
def test_converted_logits_match_transformers(converted: dict, tied: bool) -> None:
    hf_dir, step_dir, _ = converted[tied]
    tokens = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf_dir, tokens)
    got = megatron_logits(step_dir, tokens)
    assert got.shape == ref.shape == (2, 7, VOCAB)
    assert (got - ref).abs().max().item() < 1e-5


def test_step_dir_layout_and_meta(converted: dict) -> None:
    _, step_dir, _ = converted[False]
    assert step_dir.name == "step_0" and step_dir.parent.name == "checkpoints"
    assert not list(step_dir.parent.glob(".tmp-*"))
    assert json.loads((step_dir / "model" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    meta = json.loads((step_dir / "meta.json").read_text())
    assert {k: meta[k] for k in ("step", "policy_version", "tp", "pp", "family", "vocab_size", "dtype")} == {
        "step": 0, "policy_version": 0, "tp": 1, "pp": 1, "family": "qwen2", "vocab_size": VOCAB,
        "dtype": "fp32"}
    m = meta["model"]
    assert (m["hidden_size"], m["num_layers"], m["num_attention_heads"], m["num_query_groups"],
            m["ffn_hidden_size"], m["tie_word_embeddings"], m["hf_path"]) == (32, 4, 4, 2, 64, False, None)
    assert meta["hf_config"]["model_type"] == "qwen2"
    assert sorted(p.name for p in (step_dir / "hf").iterdir()) == ["config.json", "generation_config.json"]
    assert (step_dir / "ref").is_symlink() and str((step_dir / "ref").readlink()) == "model"


def test_sharded_export_loads_in_transformers(converted: dict, tmp_path: Path) -> None:
    hf_dir, step_dir, _ = converted[True]
    out = convert_mcore_to_hf(step_dir, tmp_path / "hf", max_shard_bytes=20_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    tokens = torch.arange(10).reshape(1, 10)
    assert torch.equal(hf_logits(out, tokens), hf_logits(hf_dir, tokens))


def test_bf16_roundtrip_is_bitwise(tmp_path: Path) -> None:
    original = make_hf_model(tmp_path / "hf", tied=False, dtype=torch.bfloat16)
    step_dir = convert_hf_to_mcore(tmp_path / "hf", tmp_path / "run", progress=False)
    assert json.loads((step_dir / "meta.json").read_text())["dtype"] == "bf16"
    out = convert_mcore_to_hf(step_dir, tmp_path / "back", progress=False)
    back = hf_state(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], v) for k, v in original.items())
    fp32 = hf_state(convert_mcore_to_hf(step_dir, tmp_path / "fp32", dtype="fp32", progress=False))
    assert all(torch.equal(fp32[k], v.float()) for k, v in original.items())


def test_trainer_checkpoint_without_model_meta(converted: dict, tmp_path: Path) -> None:
    """A trainer step dir has only step/policy_version/tp/pp in meta.json: the architecture
    comes from the run's config.json (vocab 0 -> read from the checkpoint) or --hf-config."""
    hf_dir, step_dir, original = converted[True]
    run = tmp_path / "run"
    trainer_step = run / "checkpoints" / "step_7"
    shutil.copytree(step_dir / "model", trainer_step / "model")
    meta = json.loads((step_dir / "meta.json").read_text())
    (trainer_step / "meta.json").write_text(json.dumps({"step": 7, "policy_version": 7, "tp": 1, "pp": 1}))
    with pytest.raises(ConversionError, match=r"has no 'model' config .*--hf-config"):
        convert_mcore_to_hf(run, tmp_path / "x", progress=False)
    via_hf = convert_mcore_to_hf(run, tmp_path / "via_hf", hf_config=hf_dir / "config.json", progress=False)
    model = dict(meta["model"], vocab_size=0)
    (run / "config.json").write_text(json.dumps({"model": model}))
    via_run = convert_mcore_to_hf(run, tmp_path / "via_run", progress=False)
    for out in (via_hf, via_run):
        back = hf_state(out)
        assert sorted(back) == sorted(original)
        assert all(torch.equal(back[k], v) for k, v in original.items())


def test_fill_reads_only_needed_tensors_once_layer_by_layer(converted: dict) -> None:
    """A first pipeline stage (no output layer / final norm) reads the embedding, then each
    layer's 12 tensors in layer order, each exactly once, and nothing else."""
    from spark_mcore.distributed.config import ParallelConfig
    from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
    from spark_mcore.models.mcore_tp import layer_index
    from spark_mcore.models.registry import get_adapter

    hf_dir, step_dir, original = converted[False]
    cfg = ModelConfig(**json.loads((step_dir / "meta.json").read_text())["model"])
    init_distributed(ParallelConfig(backend="gloo"), seed=0)
    try:
        adapter = get_adapter("qwen2", cfg)
        model = adapter.build_model(cfg, VOCAB, post_process=False, perform_initialization=False)
        reader, calls = SafetensorsReader(hf_dir), []
        get = reader.get
        reader.get = lambda name: (calls.append(name), get(name))[1]  # type: ignore[method-assign]
        fill_model_from_hf(model, reader, adapter)
    finally:
        destroy_distributed()
    assert calls[0] == "model.embed_tokens.weight" and len(calls) == len(set(calls)) == 1 + 4 * 12
    assert "lm_head.weight" not in calls and "model.norm.weight" not in calls
    layers = [layer_index(n) for n in calls[1:]]
    assert layers == sorted(layers) and set(layers) == {0, 1, 2, 3}
    assert torch.equal(model.embedding.word_embeddings.weight, original["model.embed_tokens.weight"])


def test_outputs_are_not_overwritten_silently(converted: dict, tmp_path: Path) -> None:
    hf_dir, step_dir, _ = converted[True]
    with pytest.raises(ConversionError, match=r"step_0 already exists; pass overwrite=True"):
        convert_hf_to_mcore(hf_dir, step_dir.parent.parent, progress=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="is not empty; pass overwrite=True"):
        convert_mcore_to_hf(step_dir, tmp_path / "out", progress=False)


def _write_config(path: Path, **fields: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))
    return path


def test_unsupported_architectures_name_what_is_supported(tmp_path: Path) -> None:
    supported = (r"supported: model_type 'qwen2' with architectures \['Qwen2ForCausalLM'\] "
                 r"\(Qwen2 / Qwen2.5 dense text models\)")
    cases = [("llama", ["LlamaForCausalLM"]), ("qwen2_moe", ["Qwen2MoeForCausalLM"]),
             ("qwen2_vl", ["Qwen2VLForConditionalGeneration"]),
             ("qwen2", ["Qwen2ForSequenceClassification"])]
    for i, (model_type, archs) in enumerate(cases):
        d = _write_config(tmp_path / str(i), model_type=model_type, architectures=archs)
        with pytest.raises(ConversionError, match=rf"model_type='{model_type}', architectures="
                                                  rf"\['{archs[0]}'\] is not supported .*{supported}"):
            convert_hf_to_mcore(d, tmp_path / "out", progress=False)


def test_missing_or_corrupt_input(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="is not a directory"):
        convert_hf_to_mcore(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=r"Hugging Face config: .*config.json does not exist"):
        convert_hf_to_mcore(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "qwen2", ')
    with pytest.raises(ConversionError, match="is not valid JSON"):
        convert_hf_to_mcore(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConversionError, match="is not a megatron checkpoint: expected a step directory"):
        convert_mcore_to_hf(tmp_path / "empty", tmp_path / "out")


def test_weights_not_matching_config(tmp_path: Path) -> None:
    state = make_hf_model(tmp_path / "hf", tied=True)
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"do not match the config .*model.layers.2.mlp.up_proj.weight"):
        convert_hf_to_mcore(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_impossible_layouts() -> None:
    cfg = ModelConfig(hidden_size=64, num_layers=6, num_attention_heads=8, num_query_groups=4,
                      ffn_hidden_size=96)
    with pytest.raises(ConversionError, match=r"^num_attention_heads=8 is not divisible by tp=3: .*"
                                              r"use tp in \[1, 2, 4\]$"):
        check_layout(cfg, 128, tp=3, pp=1)
    with pytest.raises(ConversionError, match=r"^num_key_value_heads \(query groups\)=4 is not "
                                              r"divisible by tp=8: .*use tp in \[1, 2, 4\]$"):
        check_layout(cfg, 128, tp=8, pp=1)
    with pytest.raises(ConversionError, match=r"^vocab_size=130 is not divisible by tp=4; use tp in "
                                              r"\[1, 2\], or pad the vocabulary to 132 "):
        check_layout(cfg, 130, tp=4, pp=1)
    with pytest.raises(ConversionError, match=r"^num_hidden_layers=6 is not divisible by pp=4; "
                                              r"use pp in \[1, 2, 3, 6\]$"):
        check_layout(cfg, 128, tp=1, pp=4)
    check_layout(cfg, 128, tp=4, pp=3)  # a valid layout passes


def test_layout_error_before_any_work(converted: dict, tmp_path: Path) -> None:
    hf_dir = converted[True][0]
    with pytest.raises(ConversionError, match=r"num_key_value_heads \(query groups\)=2 is not divisible by tp=4"):
        convert_hf_to_mcore(hf_dir, tmp_path / "out", tp=4)
    with pytest.raises(ConversionError, match=r"num_hidden_layers=4 is not divisible by pp=3"):
        convert_hf_to_mcore(hf_dir, tmp_path / "out", pp=3)
    assert not (tmp_path / "out").exists()


def test_cli_convert(converted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf_dir, step_dir, original = converted[False]
    rc = main(["convert", "mcore-to-hf", "--mcore", str(step_dir.parent.parent), "--out",
               str(tmp_path / "hf"), "--no-progress"])
    assert rc == 0 and f"wrote {tmp_path / 'hf'}" in capsys.readouterr().out
    assert torch.equal(hf_state(tmp_path / "hf")["lm_head.weight"], original["lm_head.weight"])
    rc = main(["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "m"), "--tp", "3"])
    assert rc == 2
    assert "config error: num_attention_heads=4 is not divisible by tp=3" in capsys.readouterr().err
