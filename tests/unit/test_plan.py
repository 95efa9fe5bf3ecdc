"""`spark-mcore plan` against numbers worked out by hand (the arithmetic is written out)."""

from __future__ import annotations

import json

import pytest

from spark_mcore.cli import main
from spark_mcore.config.loader import ConfigError
from spark_mcore.plan import estimate as est
from spark_mcore.plan.shapes import PRESETS, resolve_shape, shape_from_hf_config

Q7 = PRESETS["qwen2.5-7b"]


def test_qwen7b_parameter_count_by_hand() -> None:
    # h=3584, kv*d=4*128=512, f=18944, V=152064, 28 layers, untied
    # attention: 2*h*h = 25,690,112; k,v: 2*h*512 = 3,670,016; biases h + 2*512 = 4,608
    # MLP: 3*h*f = 203,685,888; norms 2*h = 7,168  -> 233,057,792 per layer
    assert Q7.layer_params() == 25_690_112 + 3_670_016 + 4_608 + 203_685_888 + 7_168 == 233_057_792
    # 28 layers 6,525,618,176 + embed and lm_head 2*V*h = 1,089,994,752 + final norm 3,584
    assert Q7.total_params() == 6_525_618_176 + 1_089_994_752 + 3_584 == 7_615_616_512


def test_vl7b_vision_tower_by_hand() -> None:
    # c=1280, fv=3420: qkv 1280*3840+3840 = 4,919,040; proj 1280*1280+1280 = 1,639,680;
    # MLP 3*1280*3420 + 2*3420 + 1280 = 13,140,920; norms 2,560 -> 19,702,200 per block, x32
    # patch conv 3*2*14*14*1280 = 1,505,280; merger 1280 + 5120*5120 + 5120 + 5120*3584 + 3584
    vl = PRESETS["qwen2.5-vl-7b"]
    per_block = 4_919_040 + 1_639_680 + 13_140_920 + 2_560
    merger = 1_280 + 26_214_400 + 5_120 + 18_350_080 + 3_584
    assert vl.vision_params() == 32 * per_block + 1_505_280 + merger == 676_550_144
    assert vl.total_params() == 7_615_616_512 + 676_550_144


def test_memory_breakdown_tp2_pp2_dp2_by_hand() -> None:
    lay = est.Layout(tp=2, pp=2, cp=1, trainer_gpus=8, rollout_gpus=8, server_tp=1)
    work = est.Workload()  # 64 x 8 x (1024 + 1024), one sequence (2048 tokens) per micro-batch
    # first stage: 14 layers * 233,057,792 + embedding 544,997,376, over tp 2
    p_first = (14 * 233_057_792 + 544_997_376) / 2
    assert est.stage_params(Q7, lay, first=True) == p_first == 1_903_903_232
    # activations per layer, SP on: 2*T*(4h/2 + (2h + 2*512 + 3f)/2) = 4096*(7168 + 32512)
    per_layer = 4096 * (7_168 + 32_512)
    assert per_layer == 162_529_280
    # 1F1B: the first stage holds pp=2 micro-batches of 14 layers -> 28 layers' worth
    assert est.activation_bytes(Q7, lay, work, first=True) == 28 * per_layer
    # last stage: 14 layers + logits and their grad 4*T*V/tp = 622,854,144
    assert est.activation_bytes(Q7, lay, work, first=False) == 14 * per_layer + 622_854_144
    mem = est.memory_breakdown(Q7, lay, work)  # the first stage is fuller
    assert mem["weights"] == 2 * p_first and mem["grads"] == 4 * p_first
    assert mem["optimizer"] == 12 * p_first / 2  # distributed optimizer over dp=2
    assert mem["reference"] == 2 * p_first
    assert mem["total"] == 14 * p_first + 28 * per_layer == 31_205_465_088


def test_recompute_and_no_distributed_optimizer() -> None:
    lay = est.Layout(tp=1, pp=1, cp=1, trainer_gpus=4, rollout_gpus=4, server_tp=1,
                     distributed_optimizer=False, recompute=True)
    work = est.Workload(micro_tokens=4096)
    # full recompute: 28 layer inputs 2*T*h + one layer's full set 2*T*(4h + 2h + 1024 + 3f)
    full_layer = 2 * 4096 * (4 * 3584 + 2 * 3584 + 1024 + 3 * 18944)
    logits = 4 * 4096 * 152064
    assert est.activation_bytes(Q7, lay, work, first=True) == 28 * 2 * 4096 * 3584 + full_layer + logits
    assert est.memory_breakdown(Q7, lay, work)["optimizer"] == 12 * Q7.total_params()


def test_kv_cache_flops_and_sync_by_hand() -> None:
    lay = est.Layout(tp=2, pp=2, cp=1, trainer_gpus=8, rollout_gpus=8, server_tp=1)
    hw, work = est.Hardware(), est.Workload()
    # K and V, 28 layers, 4 kv heads of 128, bf16: 2*28*4*128*2 = 57,344 bytes per token
    roll = est.rollout_memory(Q7, lay, hw, work)
    assert roll["kv_bytes_per_token"] == 57_344
    assert roll["weights"] == 2 * 7_615_616_512
    # forward per token: 2 * (28 * (233,057,792 - 7,168 norm params) + lm_head 544,997,376)
    #   = 14,140,829,696, plus attention 2 * 28 * 3584 * 2048 = 411,041,792
    fwd = 2 * (28 * 233_050_624 + 544_997_376) + 411_041_792
    assert est.forward_flops_per_token(Q7, 2048) == fwd == 14_551_871_488
    assert est.step_flops(Q7, work) == 5 * fwd * 1_048_576
    assert est.step_seconds(Q7, lay, hw, work) == pytest.approx(5 * fwd * 1_048_576 / (8 * 989e12 * 0.4))
    # sync: the last stage, TP-gathered: 14 layers + lm_head + norm = 3,807,810,048 params, bf16
    assert est.sync_seconds(Q7, lay, hw) == pytest.approx(2 * 3_807_810_048 / 25e9)


def test_vl32b_needs_more_than_16_gpus_and_fits_on_32() -> None:
    hw, work = est.Hardware(gpu_mem_gib=80), est.Workload()
    shape = PRESETS["qwen2.5-vl-32b"]
    # 8 trainer GPUs hold 20 bytes/param (2 + 4 + 2 + 12/dp=1) * 33.45B / 8 = 78 GiB > 72 usable
    assert est.smallest_feasible(shape, 16, hw, work) == []
    best = est.smallest_feasible(shape, 32, hw, work)[0]
    assert (best.tp, best.pp, best.dp) == (8, 1, 2) and not best.recompute
    assert est.memory_breakdown(shape, best, work)["total"] <= 72 * est.GIB


def test_hf_config_matches_preset(tmp_path) -> None:
    cfg = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
           "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert shape_from_hf_config(tmp_path).total_params() == Q7.total_params()
    vl = {"text_config": cfg, "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420}}
    (tmp_path / "config.json").write_text(json.dumps(vl))
    assert shape_from_hf_config(tmp_path).total_params() == PRESETS["qwen2.5-vl-7b"].total_params()
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        shape_from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_shape("qwen2.5-7b", str(tmp_path))


def test_cli_plan_prints_a_feasible_layout(capsys) -> None:
    assert main(["plan", "--preset", "qwen2.5-vl-32b", "--gpus", "32", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "tp8 pp1 cp1 dp2" in out and ": fits" in out and "weight sync" in out
    assert main(["plan", "--preset", "qwen2.5-vl-32b", "--gpus", "16"]) == 1
    assert "smallest fit is 32 GPUs" in capsys.readouterr().out
    assert main(["plan", "--preset", "qwen2.5-7b", "--gpus", "8", "--tp", "3"]) == 2  # config error
