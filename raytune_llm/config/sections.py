"""The run configuration's typed sections and their checks (`RunConfig` and the dataclasses it composes).

Each field is typed, defaulted and documented under it; single-field checks run in a section's `__post_init__`,
cross-section rules in `RunConfig.__post_init__`. Failures go through `_fail`, which `config.load` collects so
that one pass reports every problem of a file. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """One or more problems in a run configuration; str() lists all of them, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        head = f"{source}: {len(problems)} problem(s)" if len(problems) > 1 else f"{source}:"
        super().__init__(head + (" " if len(problems) == 1 else "\n  ") + "\n  ".join(problems))


@dataclass
class TinyModelConfig:
    """Shape of the random-weight Llama built when `model.path` is empty (the embedded default)."""

    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 256
    """Width of the SwiGLU MLP."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention when fewer than num_heads)."""
    vocab_size: int = 512
    """Vocabulary of the tokenizer trained on the bundled data (and of the model)."""

    def __post_init__(self):
        _positive(self, "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")
        if self.num_heads and self.hidden_size % self.num_heads:
            _fail(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            _fail(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")


@dataclass
class ModelSection:
    """Which base model to fine-tune and how to run it."""

    path: str | None = None
    """Local Hugging Face model folder. Empty: a tiny random Llama is built (see `tiny`)."""
    tokenizer_path: str | None = None
    """Tokenizer folder; empty: the model folder's, else one trained on the data."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the tiny model used when `path` is empty."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype; auto = bf16 on GPU, fp32 on CPU."""
    fused: bool = True
    """Swap in raytune_llm's fused Triton kernels (False: stock transformers + PEFT modules)."""
    gradient_checkpointing: Literal["off", "on", "offload"] = "off"
    """Recompute decoder layers in backward; offload keeps the checkpoints in pinned CPU memory."""
    checkpoint_layers: int | Literal["auto"] | None = None
    """With gradient_checkpointing on/offload: checkpoint only this many decoder layers (the first ones); the
    rest keep their activations and are not recomputed (faster, more memory). null = every layer. auto = the fewest
    that the memory planner fits on one GPU (the smaller of sharding.gpu_memory_gib and the device's own memory,
    with a margin) under DDP; every layer under DeepSpeed or on a CPU. `raytune-llm plan` shows the choice."""
    dequantize_once: bool = False
    """With gradient_checkpointing on/offload and 4-bit weights: a checkpointed layer's backward reuses the
    weights its recompute dequantized instead of dequantizing them again (one pass over the weights fewer per
    step, for one layer's weights held in bf16 during its backward: 0.44 GiB at 8B, 1.6 GiB at 70B)."""
    stash_attention: bool = False
    """With gradient_checkpointing offload and fused=true: each layer's forward also keeps what attention's
    backward needs (q, k, v, output) in pinned CPU memory, and the recompute replays it instead of running
    attention (and the Q/K/V projections) again. H200, 8B, QLoRA: +4% tokens/s at 4x2048, +10% at 16k, +17% at
    64k tokens, for about 2.5x the CPU memory of the offloaded checkpoints (1.3 GiB more per layer at 64k)."""
    stash_o_proj: bool = True
    """With stash_attention: the kept block ends after the O projection, whose output is kept too (3.5x the layer
    input's CPU memory instead of 2.5x; the recompute skips that GEMM: +1.9% at 4x2048 in session 10). False frees
    that memory (0.5 GiB a layer at 64k tokens of 8B) for keep_mlp_layers_on_host where the host is the limit."""
    keep_mlp_layers: int = 0
    """With gradient_checkpointing on/offload and fused=true: the last this-many checkpointed layers keep their MLP's
    gate and up outputs from forward to backward, so their recompute runs no MLP GEMM (same gradients). Costs
    2 x tokens x intermediate_size in the compute dtype per layer (448 MiB at 4x2048 tokens of Llama-3.1-8B) past
    the first kept layer, which costs little or nothing when every layer is checkpointed: backward reaches it
    first. H200, 8B, 4x2048: 3 kept layers -9.6 ms a step (1.5%) for +0.44 GiB (bench/NOTES.md, session 12)."""
    keep_mlp_layers_on_host: int = 0
    """With gradient_checkpointing=offload and fused=true: this-many more checkpointed layers keep their MLP's gate and
    up outputs, in pinned CPU memory: copied there in the forward with the layer's input, back one layer ahead of its
    backward. On the GPU one layer's at a time, during the backward of the layer above it (below the start of
    backward, where the GPU-kept layers peak, when 2 or more are kept); 2 x tokens x intermediate_size x 2 bytes of
    CPU memory and of PCIe traffic each way per layer (448 MiB at 4x2048 tokens of 8B). The layers are spread evenly
    below the GPU-kept ones, never the last layer. H200, 8B (session 16): 1x65536 keep 2, +8 / +12 layers 11,523 ->
    11,414 / 11,248 ms a step at 19.32 -> 19.77 GiB; 1x16384 keep 4, +8 1,554 -> 1,539 ms; slower at 4x2048, where the
    forward's copies already fill the PCIe link. Session 17: 1x65536 +13 11,139 ms at 117.56 GiB pinned. A GPU
    worker checks that its node can pin it all (with the layer inputs and attention stash: `raytune-llm plan`'s host
    line) and stops with a one-line error if not."""
    keep_mlp_gate_on_host: int = 0
    """With gradient_checkpointing=offload and fused=true: this-many more checkpointed layers keep their MLP's gate
    output alone in pinned CPU memory (tokens x intermediate_size x 2 bytes: 1.75 GiB at 65,536 tokens of 8B), half
    of a keep_mlp_layers_on_host layer's memory and PCIe traffic for half its saving (the recompute runs the up GEMM,
    not the gate's): for a node whose memory has room for half a layer more. Spread over the layers
    keep_mlp_layers_on_host left, below the GPU-kept ones."""
    offload_lag: int = 2
    """With gradient_checkpointing=offload: layer i's forward waits for the copies to CPU memory of layer i - this-many
    (and frees their GPU storages). More lets a burst of copies (a keep_mlp_layers_on_host layer's) run under more
    layers' compute, for one more layer's input and stash (and its MLP outputs where it is host-kept) on the GPU as
    the forward ends, each; 1 waits for the layer before.
    H200, 8B, 1x16384, 8 host-kept layers: 2 -> 3 1,537.1 -> 1,517.6 ms a step at +0.34 GiB (session 19); past 8
    host-kept layers 3 did not help (9: 1,557.5)."""
    last_layer_on_device: bool | int = False
    """With gradient_checkpointing=offload and fused=true (no effect otherwise), and every layer checkpointed: the last
    layer keeps its input and attention stash on the GPU instead of copying them to the host and back (backward
    reaches it first).
    H200, 8B: 1x16384 1,551 -> 1,540 ms a step at 9.70 -> 9.68 GiB; 4x2048 (CUDA graph) 589.1 -> 587.9 ms at +0.06 GiB
    (session 14). An integer N: the last N layers (never layer 0; true is 1), each further one holding its input and
    stash on the GPU until its backward (576 MiB at 16,384 tokens of 8B, by size) and taking them off the PCIe link, whose
    copies to the host bound keep_mlp_layers_on_host (which skips these layers)."""
    embeddings_on_host: bool = False
    """With fused=true: keep the frozen input embedding in pinned CPU memory, read over PCIe per batch by the GPU
    (the table: 0.98 GiB at Llama-3.1-8B, 1.96 GiB at 70B by size; the H200 measured a 1.10 GiB lower peak at 8B, 4x2048). Not with a tied LM head (Qwen's small models),
    trained embeddings, or DeepSpeed (a ZeRO strategy, or auto choosing one, leaves it on the GPU)."""
    head_on_host: bool = False
    """With fused=true: keep the frozen LM head in pinned CPU memory; the loss streams it in over PCIe in 4096-row
    chunks under an online softmax (`kernels.cross_entropy_streamed`): the head's 0.98 GiB (Llama-3.1-8B) leaves the
    GPU. H200, 8B, 4x2048 (CUDA graph): peak 0.92 GiB lower, 587.6 -> 586.8 ms a step (session 14). Same loss up to fp32 rounding order. Below ~6,000 tokens a step the loss
    waits on PCIe (~19 ms for the head at 2,048 tokens, by the copy rate), so short steps keep it on the device. Not with a tied or
    trained head, or DeepSpeed (a ZeRO strategy, or auto choosing one, leaves it on the GPU)."""
    weights_on_host: bool = False
    """With fused=true: keep the decoder layers' frozen base weights (3.25 GiB of packed NF4 at Llama-3.1-8B) in
    pinned CPU memory; the layer loop brings each layer's in over PCIe while the layer before it runs, and a
    checkpointed layer's backward again (`models.host_weights`): of the checkpointed layers about three have theirs
    on the GPU at a time, room for more keep_mlp_layers (layers that are not checkpointed keep theirs while
    training). Same gradients. Not with DeepSpeed (a ZeRO strategy, or auto choosing one, leaves them on the GPU).
    H200, 8B, 4x2048 (CUDA graph, keep 6): peak 7.82 -> 4.83 GiB, 582.4 -> 589.7 ms a step; with keep 13 571.0 ms at
    8.02 GiB (session 17). Pinned host memory by size: 4 GiB (each layer's buffer a power of two, 128 MiB)."""
    mlp_chunk_tokens: int | Literal["auto"] | None = "auto"
    """Run each MLP over this many tokens at a time, recomputed in backward (no [tokens, intermediate] tensor
    kept); 0/null = never; auto = only once one such tensor would pass 1 GiB (e.g. from ~37k tokens at 8B)."""
    trust_remote_code: bool = False
    """Allow a model folder's own Python code to run (off: only transformers' own classes)."""
    random_weights: bool = False
    """Draw the base weights at random on each worker (seeded by train.seed) instead of reading them: `path` then
    needs only config.json (a tokenizer too, or one is trained on the data as for any folder without one). For
    measuring a run's memory and speed (e.g. 70B across GPUs) before downloading its weights; the adapter learns
    nothing useful, so nothing is evaluated or exported."""

    def __post_init__(self):
        value = self.mlp_chunk_tokens
        if (
            value is not None
            and value != "auto"
            and (isinstance(value, bool) or not isinstance(value, int) or value < 0)
        ):
            _fail(f"mlp_chunk_tokens must be a positive integer, 0 or null (off), or 'auto'; got {value!r}")
        n = self.checkpoint_layers
        if n is not None and n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            _fail(f"checkpoint_layers must be an integer >= 0, auto, or null (every layer); got {n!r}")
        if self.dequantize_once and (self.gradient_checkpointing == "off" or not self.fused):
            _fail(
                "dequantize_once=true needs gradient_checkpointing on or offload and fused=true "
                f"(got gradient_checkpointing={self.gradient_checkpointing}, fused={self.fused})"
            )
        if self.stash_attention and (self.gradient_checkpointing != "offload" or not self.fused):
            _fail(
                "stash_attention=true needs gradient_checkpointing offload and fused=true "
                f"(got gradient_checkpointing={self.gradient_checkpointing}, fused={self.fused})"
            )
        for name, k, modes in (
            ("keep_mlp_layers", self.keep_mlp_layers, ("on", "offload")),
            ("keep_mlp_layers_on_host", self.keep_mlp_layers_on_host, ("offload",)),
            ("keep_mlp_gate_on_host", self.keep_mlp_gate_on_host, ("offload",)),
        ):
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                _fail(f"{name} must be an integer >= 0; got {k!r}")
            if k and (self.gradient_checkpointing not in modes or not self.fused):
                _fail(
                    f"{name}={k} needs gradient_checkpointing {' or '.join(modes)} and fused=true "
                    f"(got gradient_checkpointing={self.gradient_checkpointing}, fused={self.fused})"
                )
        if isinstance(self.offload_lag, bool) or not isinstance(self.offload_lag, int) or self.offload_lag < 1:
            _fail(f"offload_lag must be an integer >= 1; got {self.offload_lag!r}")
        dev = self.last_layer_on_device
        if not isinstance(dev, bool) and dev < 0:
            _fail(f"last_layer_on_device must be true, false or a layer count >= 0; got {dev!r}")
        if self.embeddings_on_host and not self.fused:
            _fail("embeddings_on_host=true needs fused=true (the patched embedding reads the host table)")
        if self.head_on_host and not self.fused:
            _fail("head_on_host=true needs fused=true (the patched loss streams the host head)")
        if self.weights_on_host and not self.fused:
            _fail("weights_on_host=true needs fused=true (the patched layer loop brings each layer's weights in)")
        if n is not None and (self.gradient_checkpointing == "off" or not self.fused):
            _fail(
                f"checkpoint_layers={n} needs gradient_checkpointing on or offload and fused=true "
                f"(got gradient_checkpointing={self.gradient_checkpointing}, fused={self.fused})"
            )


@dataclass
class LoraSection:
    """LoRA adapter attached to the frozen base (PEFT's format)."""

    r: int = 16
    """Adapter rank."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter input (above 0 takes the slower stock path)."""
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    """Linear layers that get an adapter."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""

    def __post_init__(self):
        _positive(self, "r")
        if self.alpha <= 0:
            _fail(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            _fail(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            _fail("target_modules is empty; list at least one linear layer, e.g. [q_proj, v_proj]")


@dataclass
class QuantSection:
    """Quantization of the frozen base weights."""

    bits: Literal[4, 16] = 16
    """4 = NF4 through bitsandbytes (QLoRA); 16 = base kept in the compute dtype."""
    double_quant: bool = True
    """Quantize the NF4 block scales too (saves ~0.4 bit per weight)."""
    storage_dtype: Literal["uint8", "bf16", "fp16", "fp32"] = "uint8"
    """Storage dtype of packed 4-bit weights; ZeRO-3 needs the compute float dtype to partition them."""


@dataclass
class DataSection:
    """Training data and how it is turned into packed rows."""

    path: str | None = None
    """JSONL / Parquet file, glob or saved HF dataset folder. Empty: the bundled synthetic task."""
    format: Literal["auto", "text", "prompt_completion", "alpaca", "chat"] = "auto"
    """Record format; auto detects it from the first valid record."""
    seq_len: int = 128
    """Tokens per packed row."""
    pack: bool = True
    """Pack several examples per row (attention never crosses examples)."""
    train_on_prompt: bool = False
    """Count prompt / user tokens in the loss too (default: only completions / assistant turns)."""
    num_examples: int = 6000
    """Size of the bundled synthetic dataset (ignored when `path` is set)."""
    eval_examples: int = 200
    """Held-out examples for exact-match evaluation before and after training."""
    on_bad_record: Literal["fail", "skip"] = "fail"
    """fail: stop before training naming file:line; skip: count and report bad records."""
    max_bad_fraction: float = 0.01
    """With skip, abort when the share of bad records exceeds this."""
    overlong: Literal["truncate", "drop", "split"] = "truncate"
    """What to do with an example longer than seq_len."""

    def __post_init__(self):
        _positive(self, "seq_len", "num_examples")
        if self.eval_examples < 0:
            _fail(f"eval_examples must be >= 0, got {self.eval_examples}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            _fail(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


@dataclass
class TrainSection:
    """Optimisation and the Ray Train workers."""

    num_workers: int = 2
    """Data-parallel Ray Train workers (one GPU each when GPUs exist)."""
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """auto: one GPU per worker when the cluster has GPUs."""
    cpus_per_worker: float = 0.5
    """CPUs reserved per worker on CPU-only clusters (fractions let 2 workers share a 2-core machine)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    """How workers are placed on nodes: PACK fills a node first; SPREAD puts them on different nodes."""
    micro_batch_size: int = 8
    """Rows per worker per step."""
    grad_accum: int = 1
    """Micro-batches accumulated before each optimizer step."""
    max_steps: int = 200
    """Optimizer steps."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay on adapter weights."""
    warmup_steps: int = 10
    """Linear warm-up steps, then cosine decay to 10% of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    seed: int = 0
    """Seeds data order, model init and adapter init."""
    log_every: int = 10
    """Steps between printed log lines (every step goes to metrics.jsonl)."""
    checkpoint_every: int = 100
    """Steps between checkpoints reported through Ray Train (0: only at the end)."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may make after a failure (FailureConfig)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """NaN/inf loss: stop before the optimizer step, or skip the step (abort after 3 in a row)."""
    cuda_graph: bool = False
    """Record each micro-batch's forward + backward once as a CUDA graph and replay it (models.graphs): no
    per-step Python or kernel launches, which is most of a small batch's step. Rows have one fixed length
    (the packer's); needs sharding.strategy=ddp, model.fused=true and lora.dropout=0. No effect on a CPU."""

    def __post_init__(self):
        _positive(self, "num_workers", "micro_batch_size", "grad_accum", "max_steps", "log_every")
        if self.cpus_per_worker <= 0:
            _fail(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.lr <= 0:
            _fail(f"lr must be > 0, got {self.lr}")
        for name in ("warmup_steps", "checkpoint_every", "max_failures"):
            if getattr(self, name) < 0:
                _fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip < 0:
            _fail(f"grad_clip must be >= 0, got {self.grad_clip}")


@dataclass
class ShardingSection:
    """How the model is split over workers."""

    strategy: Literal["ddp", "zero2", "zero3", "auto"] = "ddp"
    """ddp: replicate; zero2/zero3: DeepSpeed ZeRO; auto: the memory planner picks."""
    offload_optimizer: bool = False
    """ZeRO: keep optimizer states in CPU memory."""
    offload_params: bool = False
    """ZeRO-3: keep parameters in CPU memory."""
    gpu_memory_gib: float = 80.0
    """Memory per GPU the planner plans for."""

    def __post_init__(self):
        if self.gpu_memory_gib <= 1.0:
            _fail(f"gpu_memory_gib must be above 1 (GiB per GPU), got {self.gpu_memory_gib}")


@dataclass
class ClusterSection:
    """Where the run executes."""

    address: str | None = None
    """Ray address to join; empty: RAY_ADDRESS if set (as under `ray job submit`), else a local cluster."""
    storage_path: str | None = None
    """Shared folder or URI (s3://, gs://) for checkpoints, kept under <storage_path>/<name>; empty: the run folder."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Ray runtime_env for the workers (pip, env_vars, working_dir, ...)."""
    scale_up_timeout_s: float = 0.0
    """On an autoscaling cluster (cluster.yaml: GPU nodes start at 0), how long `train` and `sweep` ask for and wait
    for the GPUs and CPUs a run needs (with train.use_gpu=yes) before refusing it; 0: the cluster must have them."""

    def __post_init__(self):
        if self.scale_up_timeout_s < 0:
            _fail(f"scale_up_timeout_s must be >= 0, got {self.scale_up_timeout_s}")


@dataclass
class ExportSection:
    """What the driver writes when training ends."""

    formats: list[Literal["adapter", "hf", "gguf"]] = field(default_factory=lambda: ["adapter", "hf"])
    """Exports made at the end of training."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """dtype of the weights the hf and adapter exports write (the trained adapter in the run's adapter/ stays fp32)."""
    gguf_type: Literal["f16", "bf16", "q8_0"] = "f16"
    """Tensor type of the GGUF export."""


@dataclass
class RunConfig:
    """One fine-tuning run: every section, plus the run's name and output folder."""

    name: str = "quickstart"
    """Run name; the run folder is output_dir/name."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    quant: QuantSection = field(default_factory=QuantSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    sharding: ShardingSection = field(default_factory=ShardingSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    export: ExportSection = field(default_factory=ExportSection)
    sweep: dict[str, Any] = field(default_factory=dict)
    """Ray Tune search space and settings (used by `raytune-llm sweep`)."""

    def __post_init__(self):
        try:
            check_name(self.name, "name")
        except _FieldError as exc:
            _fail(str(exc))
        if self.sharding.offload_params and self.sharding.strategy != "zero3":
            _fail("sharding.offload_params needs sharding.strategy=zero3")
        if self.sharding.offload_optimizer and self.sharding.strategy == "ddp":
            _fail("sharding.offload_optimizer needs sharding.strategy zero2, zero3 or auto")
        if self.model.random_weights:
            if not self.model.path:
                _fail(
                    "model.random_weights needs model.path, a folder with the model's config.json "
                    "(the built-in tiny model is random already)"
                )
            if self.export.formats:
                _fail(
                    "model.random_weights trains on weights that are never saved, so there is nothing to export: "
                    f"set export.formats=[] (got {list(self.export.formats)})"
                )
        for name in ("embeddings_on_host", "head_on_host", "weights_on_host"):
            if getattr(self.model, name) and self.sharding.strategy in ("zero2", "zero3"):
                _fail(
                    f"model.{name} needs sharding.strategy ddp or auto (DeepSpeed places every weight "
                    f"itself), got {self.sharding.strategy}"
                )
        if self.quant.bits == 4 and self.model.dtype == "fp16" and self.sharding.strategy == "zero3":
            _fail("quant.bits=4 with sharding.strategy=zero3 needs model.dtype bf16 or fp32 (storage dtype)")
        if self.train.cuda_graph:
            if self.sharding.strategy != "ddp":
                _fail(
                    f"train.cuda_graph needs sharding.strategy=ddp (DeepSpeed steps its own engine), got {self.sharding.strategy}"
                )
            if not self.model.fused:
                _fail(
                    "train.cuda_graph needs model.fused=true (the stock forwards read packed rows' bounds on the host)"
                )
            if self.lora.dropout > 0:
                _fail(
                    f"train.cuda_graph needs lora.dropout=0 (a recorded recompute cannot replay dropout masks), got {self.lora.dropout}"
                )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ----------------------------------------------------------------------------------------- helpers


class _FieldError(ValueError):
    pass


# Open `_build` calls' lists: a section's checks (`__post_init__`) record every failure there instead of stopping at
# the first, so that one run of `validate` names every problem of a file.
_collecting: list[list[str]] = []


def _fail(msg: str):
    if _collecting:
        _collecting[-1].append(msg)
        return
    raise _FieldError(msg)


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            _fail(f"{name} must be > 0, got {value}")


def check_name(value: str, key: str) -> str:
    """Reject run/checkpoint/export names that could escape their folder.

    Raises:
        ValueError: on an empty name, `..`, a path separator, an absolute path or a NUL byte.
    """
    if not value or "\x00" in value or value in (".", "..") or "/" in value or "\\" in value or ".." in value:
        raise _FieldError(f"{key} {value!r} is not a plain name (no '/', '..', NUL or absolute paths)")
    return value
