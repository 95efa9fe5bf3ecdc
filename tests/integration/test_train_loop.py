"""Two full GRPO steps of the real loop (Megatron actor, transformers engine, verifier pool) on CPU."""

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import spark_mcore.train as train_module
from spark_mcore.config.run import load_run_config
from spark_mcore.data.tokenizer import load_tokenizer
from spark_mcore.train import train

MICRO = [
    "model.hidden_size=32", "model.num_layers=2", "model.ffn_hidden_size=64",
    "data.prompts_per_step=4", "data.train_size=64", "data.test_size=8", "data.levels=[1]",
    "rollout.n=4", "rollout.max_new_tokens=12", "warmstart.steps=3", "warmstart.batch_size=8",
    "trainer.steps=2", "trainer.micro_batch_size=8", "eval.max_new_tokens=12", "logging.progress=false",
]


def _merged(actor) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in actor.export_hf()}


def test_two_grpo_steps_end_to_end(tmp_path: Path, capsys, monkeypatch) -> None:
    cfg = load_run_config(None, [*MICRO, f"checkpoint.dir={tmp_path}", "trainer.updates_per_step=2",
                                 "eval.samples=2"])
    runs, after_sft = [], {}
    build_run, warm_start = train_module.build_run, train_module.warm_start

    def spy_build(c):
        runs.append(build_run(c))
        # A tiny model 3 SFT steps in answers nothing right, so every group would have the same
        # reward and GRPO no gradient: score by a parity of the text instead (mixed groups).
        runs[-1].pool.score = lambda items: [float(zlib.crc32(text.encode()) % 2) for _, text, _ in items]
        return runs[-1]

    def spy_warm(actor, *args, **kw):
        out = warm_start(actor, *args, **kw)
        after_sft.update(_merged(actor))
        return out

    monkeypatch.setattr(train_module, "build_run", spy_build)
    monkeypatch.setattr(train_module, "warm_start", spy_warm)
    results = train(cfg)
    out = capsys.readouterr().out
    assert "[policy step 1, policy 1/2]" in out and "[policy step 2, policy 2/2]" in out
    assert "| after SFT warm start |" in out and "| after RL |" in out
    assert "sampled accuracy (mean of 2/prompt)" in out
    assert set(results) == {"start", "rl"} and results["rl"].num_prompts == 8
    assert all(0.0 <= r.sampled_accuracy <= 1.0 and r.sampled_n == 2 for r in results.values())
    # artifacts: dist checkpoint, HF export loadable by transformers, eval json, tensorboard
    ckpt = tmp_path / "checkpoints" / "step_2"
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 2
    # two optimizer steps per policy step (trainer.updates_per_step=2)
    assert json.loads((ckpt / "trainer_state.json").read_text())["scheduler"]["num_steps"] == 4
    assert (ckpt / "model" / "metadata.json").is_file()
    assert json.loads((tmp_path / "eval_rl.json").read_text())["num_prompts"] == 8
    assert any((tmp_path / "tb").iterdir())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert model.config.vocab_size >= len(tok)
    # the export's tokenizer gives the ids the policy was trained on
    trained = load_tokenizer(tmp_path / "tokenizer")
    text = "6+72=?\nSolve step by step. Put the final answer in \\boxed{}."
    assert tok.encode(text) == trained.encode(text)
    # the export is the actor's final merged weights, and the GRPO steps changed them
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    final = _merged(runs[0].actor)
    assert set(exported) == set(final) == set(after_sft)
    assert all(torch.equal(exported[n], final[n]) for n in final)
    changed = [n for n in final if not torch.equal(final[n], after_sft[n])]
    assert len(changed) > len(final) // 2, f"GRPO changed only {changed}"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[n], final[n]) for n in final if n in loaded)
