"""The SPRM step head in the trainer (model.step_head): step positions from text, labels, the
loss the actor adds against a hand recomputation, micro-batch invariance, the 1e-4 scaling
checked on the backbone's gradient, the HF second-to-last hidden state the eval scorer reads,
the layout refusal, export/load and the best-of-N selection."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import spark_mcore.config  # noqa: F401  (import order: loader before component configs)
from spark_mcore.algo.config import AlgoConfig
from spark_mcore.algo.step_head import class_weights, step_bce_loss
from spark_mcore.config.loader import ConfigError
from spark_mcore.config.run import load_run_config
from spark_mcore.data.steps import StepFinder, text_step_positions
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
from spark_mcore.eval.best_of import StepHeadScorer, selection_accuracy
from spark_mcore.models.config import ModelConfig, StepHeadConfig
from spark_mcore.models.step_head import StepHead, load_step_head, save_step_head
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.batching import step_labels
from spark_mcore.trainer.config import TrainerConfig
from spark_mcore.trainer.step_head import StepHeadTrainer
from spark_mcore.types import Completion, Prompt, Rollout, TrainBatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from padded_batch import padded_batch  # noqa: E402

VOCAB = 64


# ---------------------------------------------------------------- steps and labels
def test_text_step_positions_hand_computed() -> None:
    # "1*8=8. 9*8=72. \boxed{72}" split oddly: the delimiter ". " spans tokens 5 and 6
    pieces = ["1", "*", "8", "=", "8", ".", " 9", "*", "8", "=", "72", ". ", "\\boxed{", "72", "}"]
    assert text_step_positions(pieces, ". ") == [4, 10]
    assert text_step_positions(pieces, ". ", include_end=True) == [4, 10, 14]
    assert text_step_positions(["a.", " b", ". "], ". ", include_end=True) == [0, 1]  # ends in the delimiter
    assert text_step_positions([". ", "x"], ". ") == []  # nothing before it
    assert text_step_positions(["x.\n\ny", ".\n\n"], ".\n\n") == [0]  # two in one token: one step end each
    with pytest.raises(ValueError, match="non-empty"):
        text_step_positions(["x"], "")


def test_step_finder_decodes_each_token_once() -> None:
    calls: list[int] = []
    vocab = {1: "3", 2: "+", 3: "4", 4: "=7", 5: ".", 6: " ", 7: "7", 9: "<eos>"}
    tok = SimpleNamespace(decode=lambda ids: (calls.append(ids[0]), vocab[ids[0]])[1], all_special_ids=[9])
    finder = StepFinder(tok, ". ", include_end=True)
    assert finder([1, 2, 3, 4, 5, 6, 7, 9]) == [3, 6]  # "=7" ends step 1; "7" is the last step
    assert finder([1, 2, 3, 4, 5, 6, 7]) == [3, 6]
    assert sorted(calls) == [1, 2, 3, 4, 5, 6, 7]  # cached; the special token is never decoded


def _rollout(prompt_len: int, response: list[int], reward: float, kind: str | None = None) -> Rollout:
    meta = {} if kind is None else {"spark_kind": kind}
    prompt = Prompt(id="p", messages=[{"role": "user", "content": "q"}], answer="1", meta=meta)
    return Rollout(prompt=prompt, prompt_ids=list(range(prompt_len)),
                   completion=Completion(token_ids=response, text=""), reward=reward)


def test_step_labels_positions_in_the_row_and_outcomes() -> None:
    from spark_mcore.types import KIND_KEY

    steps_of = lambda ids: [i for i, t in enumerate(ids) if t == 5]  # noqa: E731
    rows = [_rollout(3, [1, 5, 2, 5], 1.0), _rollout(2, [5, 1], 0.0), _rollout(2, [5, 5], 1.0)]
    rows[2].prompt.meta[KIND_KEY] = "pointwise"  # a recycled judge task: no steps
    pos, outcomes = step_labels(rows, steps_of)
    assert pos.tolist() == [[4, 6], [2, -1], [-1, -1]]
    assert outcomes.tolist() == [1.0, 0.0, 1.0]


def test_class_weights_and_normalised_bce_hand_computed() -> None:
    assert class_weights(2, 6) == (1.5 * 6 / 8, 2 / 8)
    assert class_weights(2, 6, positive_factor=1.0) == (6 / 8, 2 / 8)
    logits, labels = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    keep = torch.tensor([True, True, False])
    got = step_bce_loss(logits, labels, keep, 1.125, 0.25, denominator=8.0)
    want = (1.125 * math.log1p(math.exp(-2.0)) + 0.25 * math.log1p(math.exp(-1.0))) / 8.0
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_config_checks_name_the_field() -> None:
    with pytest.raises(ConfigError, match="step_head.delimiter"):
        StepHeadConfig(delimiter="")
    with pytest.raises(ConfigError, match="step_head.dropout"):
        StepHeadConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="model.num_layers"):
        ModelConfig(num_layers=1, step_head=True)
    with pytest.raises(ConfigError, match="parallel.cp=1"):
        load_run_config(None, ["model.step_head=true", "parallel.cp=2"])
    assert load_run_config(None, ["model.step_head=true", "step_head.lr=0.001"]).step_head.lr == 0.001


# ---------------------------------------------------------------- the head in the actor
@pytest.fixture(scope="module")
def pstate() -> Iterator[object]:
    state = init_distributed(ParallelConfig(), seed=7)
    yield state
    destroy_distributed()


def _actor(pstate: object, mbs: int, scale: float = 1e-4) -> MegatronActor:
    model = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=64, max_position_embeddings=64, step_head=True)
    trainer = TrainerConfig(micro_batch_size=mbs, lr=1e-2, warmup_ratio=0.0)
    head = StepHeadConfig(dropout=0.0, backbone_grad_scale=scale, lr=1e-2)
    actor = MegatronActor(model, trainer, AlgoConfig(kl_coef=0.0), pstate, VOCAB, step_head=head)
    actor.setup_optimizer(lr=1e-2, total_steps=10, warmup_steps=0)
    return actor


def _batch() -> TrainBatch:
    """Zero advantages (no policy gradient: every backbone gradient comes from the head)."""
    steps = torch.tensor([[4, 6, 9], [5, 7, -1], [3, -1, -1], [-1, -1, -1], [4, 8, -1], [6, -1, -1]])
    return padded_batch(VOCAB, torch.zeros(6), step_positions=steps,
                        outcomes=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]))


def _layer1_output(actor: MegatronActor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T, C] output of the second-to-last layer (layer 1 of 2), by a hook of our own."""
    seen = []
    handle = actor.unwrapped.decoder.layers[0].register_forward_hook(lambda m, a, out: seen.append(out[0]))
    with torch.no_grad():
        actor.adapter.forward(actor.unwrapped.eval(), tokens)
    handle.remove()
    return seen[0].transpose(0, 1)


def _expected_loss(actor: MegatronActor, batch: TrainBatch) -> float:
    hidden = _layer1_output(actor, batch.tokens)
    head = actor.step_head.head.eval()
    valid = batch.step_positions >= 0
    labels = batch.outcomes[:, None].expand_as(valid)
    n_pos, n_neg = float((valid & (labels > 0.5)).sum()), float((valid & (labels < 0.5)).sum())
    w_pos, w_neg = 1.5 * n_neg / (n_pos + n_neg), n_pos / (n_pos + n_neg)
    total = 0.0
    for b, s in valid.nonzero().tolist():
        with torch.no_grad():
            z = float(head(hidden[b, batch.step_positions[b, s]]))
        y = float(labels[b, s])
        if (z > 0) == (y > 0.5):  # only steps whose prediction agrees with the label
            total += (w_pos if y > 0.5 else w_neg) * math.log1p(math.exp(-z if y > 0.5 else z))
    return total / (n_pos + n_neg)


def test_head_loss_matches_hand_recomputation_and_micro_batching(pstate: object) -> None:
    actor = _actor(pstate, mbs=6)
    initial = {k: v.clone() for k, v in actor.unwrapped.state_dict().items() if torch.is_tensor(v)}
    head0 = {k: v.clone() for k, v in actor.step_head.head.state_dict().items()}
    batch = _batch()
    want = _expected_loss(actor, batch)
    results = []
    for mbs in (6, 2):
        actor.unwrapped.load_state_dict(initial, strict=False)
        actor.step_head.head.load_state_dict(head0)
        actor.cfg.micro_batch_size = mbs
        metrics = actor.train_step(batch)
        grads = {k: v.main_grad.detach().clone() for k, v in actor.unwrapped.named_parameters()}
        results.append((metrics, grads, {k: v.clone() for k, v in actor.step_head.head.state_dict().items()}))
    (m0, g0, h0), (m1, g1, h1) = results
    assert m0["step_head/steps"] == 9 and m0["step_head/loss"] == pytest.approx(want, rel=1e-5)
    assert 0 < m0["step_head/kept"] <= 9 and m0["step_head/acc"] == m0["step_head/kept"] / 9
    assert m1["step_head/loss"] == pytest.approx(m0["step_head/loss"], rel=1e-6)
    for name in g0:
        assert torch.allclose(g1[name], g0[name], atol=1e-10, rtol=1e-5), name
    assert all(torch.allclose(h1[k], h0[k], atol=1e-7) for k in h0) and any(
        not torch.equal(h0[k], head0[k]) for k in h0)  # the head's own AdamW moved it


def test_backbone_receives_the_head_gradient_scaled(pstate: object) -> None:
    batch = _batch()
    grads, heads = {}, {}
    actor = _actor(pstate, mbs=3)
    initial = {k: v.clone() for k, v in actor.unwrapped.state_dict().items() if torch.is_tensor(v)}
    head0 = {k: v.clone() for k, v in actor.step_head.head.state_dict().items()}
    for scale in (1.0, 1e-4):  # the same backbone and head, only the scale differs
        actor.unwrapped.load_state_dict(initial, strict=False)
        actor.step_head.head.load_state_dict(head0)
        actor.step_head.head.backbone_grad_scale = scale
        actor.train_step(batch)
        grads[scale] = {k: v.main_grad.detach().clone() for k, v in actor.unwrapped.named_parameters()}
        heads[scale] = {k: v.clone() for k, v in actor.step_head.head.state_dict().items()}
    emb = "embedding.word_embeddings.weight"
    assert float(grads[1.0][emb].abs().max()) > 1e-6  # the head's gradient reached the backbone
    for name, g in grads[1.0].items():
        assert torch.allclose(grads[1e-4][name], g * 1e-4, atol=1e-12, rtol=1e-4), name
    last = [n for n in grads[1.0] if "layers.1." in n]  # the last layer is after the head's input
    assert last and all(float(grads[1.0][n].abs().max()) == 0 for n in last)
    for k in heads[1.0]:  # the head itself trains at full scale either way
        assert torch.allclose(heads[1.0][k], heads[1e-4][k], atol=1e-7)


def test_hf_second_to_last_hidden_state_is_what_the_head_trained_on(pstate: object, tmp_path: Path) -> None:
    from transformers import Qwen2ForCausalLM

    actor = _actor(pstate, mbs=6)
    batch = _batch()
    hidden = _layer1_output(actor, batch.tokens)
    tok = SimpleNamespace(eos_token_id=1, pad_token_id=0)
    hf = Qwen2ForCausalLM(actor.hf_config(tok)).eval()
    hf.load_state_dict(dict(actor.export_hf()), strict=False)
    save_step_head(actor.step_head.head, tmp_path)
    head = load_step_head(tmp_path)
    row, plen = batch.tokens[0, :10].tolist(), 3
    steps_of = lambda ids: [1, 3, 6]  # noqa: E731  response-relative: rows 0's positions 4, 6, 9
    score = StepHeadScorer(hf, head, steps_of)(None, row[:plen], [row[plen:]], [""])[0]
    with torch.no_grad():
        z = head(hidden[0, [4, 6, 9]])
    assert score == pytest.approx(float(torch.sigmoid(z).prod() ** (1 / 3)), rel=1e-4)


def test_layout_without_the_second_to_last_layer_is_refused(pstate: object) -> None:
    chunk = SimpleNamespace(decoder=SimpleNamespace(layers=[SimpleNamespace(layer_number=8)]))
    with pytest.raises(ConfigError, match="second-to-last.*last stage"):
        StepHeadTrainer(StepHeadConfig(), chunk, num_layers=8, hidden_size=4, pstate=pstate, seed=0)


def test_head_init_is_a_function_of_the_seed() -> None:
    a, b = StepHead(4), StepHead(4)
    torch.manual_seed(1)
    a.init_weights(5)
    torch.manual_seed(2)
    b.init_weights(5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_export_round_trip_and_missing_file(tmp_path: Path) -> None:
    head = StepHead(6, dropout=0.25)
    head.init_weights(3)
    path = save_step_head(head, tmp_path)
    back = load_step_head(path)
    assert back.net[2].p == 0.25 and not back.training
    assert all(torch.equal(x, y) for x, y in zip(head.state_dict().values(), back.state_dict().values(), strict=True))
    with pytest.raises(FileNotFoundError, match="model.step_head=true"):
        load_step_head(tmp_path / "nowhere")


# ---------------------------------------------------------------- best-of-N selection
def test_selection_accuracy_hand_computed() -> None:
    correct = torch.tensor([[False, True, False], [False, False, False], [True, True, False]])
    scores = torch.tensor([[0.2, 0.9, 0.1], [0.5, 0.4, 0.3], [0.1, 0.1, 0.8]])
    selected, pass_n, avg_n = selection_accuracy(correct, scores)
    assert (selected, pass_n) == (pytest.approx(1 / 3), pytest.approx(2 / 3))  # only prompt 0 picks a right one
    assert avg_n == pytest.approx(3 / 9)
    with pytest.raises(ValueError, match="one \\[P, N\\] shape"):
        selection_accuracy(correct, scores[:, :2])


def test_convert_writes_the_checkpointed_head_beside_the_weights(tmp_path: Path) -> None:
    from spark_mcore.checkpoint.convert import _export_step_head

    head = StepHead(6)
    head.init_weights(4)
    torch.save({"head": head.state_dict(), "optimizer": {}, "steps": torch.tensor(3)}, tmp_path / "step_head.pt")
    (tmp_path / "hf").mkdir()
    _export_step_head(tmp_path, tmp_path / "hf")
    back = load_step_head(tmp_path / "hf")
    assert all(torch.equal(x, y) for x, y in zip(head.state_dict().values(), back.state_dict().values(), strict=True))
