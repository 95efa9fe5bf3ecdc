"""Memory, FLOPs and time estimates for one trainer layout plus its SGLang rollout servers.

Byte counts per parameter (megatron mixed precision as the actor configures it):
  weights 2 (bf16), grads 4 (DDP grad_reduce_in_fp32=True), reference copy 2 (bf16, when the
  KL term is on), optimizer 12 (fp32 main params + Adam m and v), divided by DP x CP with the
  distributed optimizer.
Parameters per GPU are those of the worst pipeline stage, split by TP (norms and biases too:
a slight underestimate, well under 0.1 %).

Activations per layer per micro-batch of T tokens on one GPU (bf16, flash attention so no
T x T scores, no dropout): layer-norm inputs and outputs 4h, Q,K,V h + 2 kv d, attention
output h, MLP in 2f, MLP act f:  2 * T * (4h / s + (2h + 2 kv d + 3f) / tp) bytes, s = tp with
sequence parallel, else 1 (the norm terms are replicated). Under 1F1B, pipeline stage i holds
(pp - i) micro-batches of L / pp layers, so the first stage holds L layers' worth. Full
recompute keeps only each layer's input (2 T h / s) plus one layer's full set. The last stage
adds the logits and their gradient, 4 T V / tp (bf16). T is micro_tokens / cp.

Model FLOPs per token of one forward: 2 x (matmul parameters) + 2 L h S (causal attention
QK^T and AV, S the sequence length). A GRPO step runs the policy forward+backward (3x), the
old log-prob forward (1x) and the reference forward (1x): 5 forwards. Recompute and the vision
tower are not counted (MFU is model FLOPs, recompute shows up as a lower achievable MFU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spark_mcore.config.loader import ConfigError
from spark_mcore.plan.shapes import ModelShape

GIB = 1024**3


@dataclass(frozen=True)
class Hardware:
    """gpu_mem_gib: memory per GPU; usable: share left after CUDA context, NCCL buffers and
    fragmentation; peak_tflops: dense bf16 peak per GPU (H100/H200 SXM 989); link_gbps: GB/s of
    the trainer -> SGLang weight-sync link (one 200 Gb/s NIC ~ 25); gpus_per_node bounds TP."""

    gpu_mem_gib: float = 80.0
    usable: float = 0.9
    peak_tflops: float = 989.0
    mfu: float = 0.4
    link_gbps: float = 25.0
    gpus_per_node: int = 8


@dataclass(frozen=True)
class Workload:
    """One RL step: prompts x n sequences of prompt_len + new_tokens tokens."""

    prompts: int = 64
    n: int = 8
    prompt_len: int = 1024
    new_tokens: int = 1024
    micro_tokens: int = 0  # 0: one sequence per micro-batch
    reference: bool = True  # the KL term keeps a frozen copy

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.new_tokens

    @property
    def step_tokens(self) -> int:
        return self.prompts * self.n * self.seq_len

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_tokens or self.seq_len


@dataclass(frozen=True)
class Layout:
    """Trainer tp x pp x cp x dp on trainer_gpus, SGLang servers of server_tp GPUs on rollout_gpus."""

    tp: int
    pp: int
    cp: int
    trainer_gpus: int
    rollout_gpus: int
    server_tp: int
    distributed_optimizer: bool = True
    recompute: bool = False
    sequence_parallel: bool | None = None  # None: on when tp > 1 (needs Transformer Engine)

    @property
    def dp(self) -> int:
        return self.trainer_gpus // (self.tp * self.pp * self.cp)

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    def name(self) -> str:
        extras = (["distopt"] if self.distributed_optimizer else []) + (["recompute"] if self.recompute else [])
        return (f"tp{self.tp} pp{self.pp} cp{self.cp} dp{self.dp}{' + ' + ' + '.join(extras) if extras else ''}"
                f" | rollout {self.rollout_gpus // self.server_tp} x tp{self.server_tp}")


def check_layout(shape: ModelShape, lay: Layout) -> str | None:
    """None when megatron can build the layout, else the reason."""
    mp = lay.tp * lay.pp * lay.cp
    if lay.trainer_gpus < 1 or lay.trainer_gpus % mp:
        return f"trainer GPUs {lay.trainer_gpus} not divisible by tp*pp*cp={mp}"
    for what, value, div in (("num_attention_heads", shape.heads, lay.tp),
                             ("num_key_value_heads", shape.kv_heads, lay.tp),
                             ("ffn", shape.ffn, lay.tp), ("vocab", shape.vocab, lay.tp),
                             ("num_layers", shape.layers, lay.pp)):
        if value % div:
            return f"{what}={value} not divisible by {div}"
    if lay.rollout_gpus < lay.server_tp or lay.rollout_gpus % lay.server_tp:
        return f"rollout GPUs {lay.rollout_gpus} not a multiple of the server TP {lay.server_tp}"
    return None


def stage_params(shape: ModelShape, lay: Layout, first: bool) -> float:
    """Parameters on one GPU of the first (embeddings, vision) or last (lm_head, final norm) stage."""
    per_stage = shape.layers // lay.pp * shape.layer_params()
    emb = shape.embedding_params()
    first_extra = emb + shape.vision_params()
    last_extra = (0 if shape.tied else emb) + shape.hidden
    if lay.pp == 1:
        extra = first_extra + last_extra
    else:  # with pp > 1 a tied lm_head is a copy on the last stage
        extra = first_extra if first else emb + shape.hidden
    return (per_stage + extra) / lay.tp


def activation_bytes(shape: ModelShape, lay: Layout, work: Workload, first: bool) -> float:
    """Activations held on the first or last pipeline stage (see the module docstring)."""
    t = work.tokens_per_micro_batch / lay.cp
    h, kvd, f = shape.hidden, shape.kv_heads * shape.head_dim, shape.ffn
    s = lay.tp if lay.sp else 1
    per_layer = 2 * t * (4 * h / s + (2 * h + 2 * kvd + 3 * f) / lay.tp)
    layers_held = shape.layers if first else shape.layers // lay.pp
    if lay.recompute:
        held = layers_held * 2 * t * h / s + per_layer
    else:
        held = layers_held * per_layer
    logits = 4 * t * shape.vocab / lay.tp if (not first or lay.pp == 1) else 0.0
    return held + logits


def memory_breakdown(shape: ModelShape, lay: Layout, work: Workload) -> dict[str, float]:
    """Bytes per trainer GPU of the fuller pipeline stage, by kind, plus 'total'."""
    rows = []
    for first in (True, False):
        p = stage_params(shape, lay, first)
        shard = lay.dp * lay.cp if lay.distributed_optimizer else 1
        row = {"weights": 2 * p, "grads": 4 * p, "optimizer": 12 * p / shard,
               "reference": 2 * p if work.reference else 0.0,
               "activations": activation_bytes(shape, lay, work, first)}
        row["total"] = sum(row.values())
        rows.append(row)
    return max(rows, key=lambda r: r["total"])


def rollout_memory(shape: ModelShape, lay: Layout, hw: Hardware, work: Workload,
                   mem_fraction: float = 0.85) -> dict[str, float]:
    """One SGLang server GPU: weights, KV bytes per token, KV capacity in tokens for all servers.

    KV heads split over the server's TP, replicated once TP exceeds them."""
    weights = 2 * shape.total_params() / lay.server_tp
    kv_heads = math.ceil(shape.kv_heads / lay.server_tp)
    kv_per_token = 2 * shape.layers * kv_heads * shape.head_dim * 2
    pool = max(0.0, mem_fraction * hw.gpu_mem_gib * GIB - weights)
    servers = lay.rollout_gpus // lay.server_tp
    capacity = servers * math.floor(pool / kv_per_token)
    return {"weights": weights, "kv_bytes_per_token": kv_per_token, "kv_pool": pool,
            "capacity_tokens": capacity, "step_tokens": work.step_tokens,
            "waves": math.inf if capacity == 0 else math.ceil(work.step_tokens / capacity)}


def forward_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    matmul = shape.layers * (shape.layer_params() - 2 * shape.hidden) + shape.embedding_params()
    return 2 * matmul + 2 * shape.layers * shape.hidden * seq_len


def step_flops(shape: ModelShape, work: Workload) -> float:
    passes = 3 + 1 + (1 if work.reference else 0)
    return passes * forward_flops_per_token(shape, work.seq_len) * work.step_tokens


def step_seconds(shape: ModelShape, lay: Layout, hw: Hardware, work: Workload) -> float:
    return step_flops(shape, work) / (lay.trainer_gpus * hw.peak_tflops * 1e12 * hw.mfu)


def sync_seconds(shape: ModelShape, lay: Layout, hw: Hardware) -> float:
    """One sender per PP stage broadcasts its stage's full (TP-gathered) bf16 weights; stages
    send in parallel, so the largest stage sets the time."""
    biggest = max(stage_params(shape, lay, True), stage_params(shape, lay, False)) * lay.tp
    return 2 * biggest / (hw.link_gbps * 1e9)


def feasible(shape: ModelShape, lay: Layout, hw: Hardware, work: Workload) -> bool:
    budget = hw.gpu_mem_gib * GIB * hw.usable
    if memory_breakdown(shape, lay, work)["total"] > budget:
        return False
    return rollout_memory(shape, lay, hw, work)["capacity_tokens"] >= work.seq_len


def _pow2_upto(n: int) -> list[int]:
    return [v for v in (1, 2, 4, 8, 16, 32, 64) if v <= n]


def candidate_layouts(shape: ModelShape, gpus: int, hw: Hardware, rollout_gpus: int | None,
                      cp: int = 1, distributed_optimizer: bool = True) -> list[Layout]:
    """Every buildable layout: trainer TP within a node, PP dividing the layers, rollout_gpus
    (default half of all) for SGLang servers of the smallest TP whose weights take at most half
    a GPU (the rest is KV cache)."""
    if gpus < 2:
        raise ConfigError(f"--gpus {gpus}: need at least 2 (trainer and SGLang GPUs are disjoint)")
    out = []
    for rg in [rollout_gpus if rollout_gpus is not None else gpus // 2]:
        server_tp = next((t for t in _pow2_upto(min(rg, hw.gpus_per_node))
                          if 2 * shape.total_params() / t <= 0.5 * hw.gpu_mem_gib * GIB), None)
        if server_tp is None:
            continue
        for tp in _pow2_upto(hw.gpus_per_node):
            for pp in (p for p in range(1, shape.layers + 1) if shape.layers % p == 0 and p <= 16):
                for recompute in (False, True):
                    lay = Layout(tp, pp, cp, gpus - rg, rg, server_tp, distributed_optimizer, recompute)
                    if check_layout(shape, lay) is None:
                        out.append(lay)
    return out


def smallest_feasible(shape: ModelShape, gpus: int, hw: Hardware, work: Workload,
                      rollout_gpus: int | None = None, cp: int = 1, distributed_optimizer: bool = True,
                      limit: int = 5) -> list[Layout]:
    """Feasible layouts, smallest model-parallel size first (more DP, less communication), then
    without recompute, then most trainer GPUs, then less PP (smaller bubble)."""
    ok = [lay for lay in candidate_layouts(shape, gpus, hw, rollout_gpus, cp, distributed_optimizer)
          if feasible(shape, lay, hw, work)]
    ok.sort(key=lambda lay: (lay.tp * lay.pp * lay.cp, lay.recompute, -lay.trainer_gpus, lay.pp))
    return ok[:limit]


def min_gpus(shape: ModelShape, hw: Hardware, work: Workload, up_to: int = 256) -> Layout | None:
    """The smallest layout at the first GPU count (whole nodes) at which one fits."""
    for gpus in range(hw.gpus_per_node, up_to + 1, hw.gpus_per_node):
        found = smallest_feasible(shape, gpus, hw, work, limit=1)
        if found:
            return found[0]
    return None

