"""`selfmtp plan`: per-device training memory under DDP and FSDP, before anything is loaded.

Every figure is bytes per device for one optimizer step of `selfmtp train`:
    weights     the student's float32 master weights (the trainer keeps float32; bf16 is compute only)
    gradients   float32, one per trainable weight; DDP adds its gradient buckets (one more copy,
                PyTorch's default `gradient_as_bucket_view=False`)
    optimizer   AdamW's two float32 moments per trainable weight
    teacher     the frozen float32 copy (none with LoRA, whose teacher is the adapter-disabled student,
                or under --gated, whose teacher is the ungated student)
    transient   FSDP only: the all-gathered root (embeddings, output head) and two decoder layers
                (current + prefetched) in the compute dtype, and one layer's unsharded gradient
    activations what the student's forward saves for backward (`activation_bytes`), which
                `benchmarks/plan_check.py` measures on a real step with `torch.autograd.graph.saved_tensors_hooks`
FSDP divides weights, gradients, optimizer and teacher by the device count; DDP holds them whole.
Not counted: the CUDA context and allocator fragmentation (keep the headroom `HEADROOM` leaves).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from selfmtp.errors import SelfMTPError

GB = 1e9
HEADROOM = 0.9  # plan to 90% of the device: the CUDA context and fragmentation take the rest
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a Llama-like decoder."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads (Llama); Qwen3 sets its own (heads x head_dim != hidden)

    @property
    def attention_widths(self) -> tuple[int, int]:
        """(q width = heads x head_dim, k/v width = kv_heads x head_dim)."""
        head_dim = self.head_dim or self.hidden // self.heads
        return self.heads * head_dim, self.kv_heads * head_dim

    @property
    def layer_parameters(self) -> int:
        q, kv = self.attention_widths
        attention = 2 * self.hidden * q + 2 * self.hidden * kv  # q, o; k, v
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden  # gate/up/down, two norms

    @property
    def root_parameters(self) -> int:
        """Embeddings, final norm and an untied output head: what is not in a decoder layer."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + self.root_parameters

    def lora_parameters(self, rank: int) -> int:
        """peft "all-linear" (q, k, v, o, gate, up, down; not the head) plus the trainable `<mtp>` row."""
        q, kv = self.attention_widths  # q: h -> q, k and v: h -> kv, o: q -> h, gate/up: h -> i, down: i -> h
        per_layer = rank * (2 * (self.hidden + q) + 2 * (self.hidden + kv) + 3 * (self.hidden + self.intermediate))
        return self.layers * per_layer + self.hidden


# Public Llama-like shapes, chosen by the nearest parameter count for `--params N`.
KNOWN_SHAPES = {
    "SmolLM2-135M": Shape(576, 30, 1536, 9, 3, 49152, True),
    "Llama-3.2-1B": Shape(2048, 16, 8192, 32, 8, 128256, True),
    "Llama-3.2-3B": Shape(3072, 28, 8192, 24, 8, 128256, True),
    "Qwen3-4B": Shape(2560, 36, 9728, 32, 8, 151936, True, head_dim=128),
    "Llama-3.1-8B": Shape(4096, 32, 14336, 32, 8, 128256, False),
    "Qwen3-14B": Shape(5120, 40, 17408, 40, 8, 151936, False, head_dim=128),
    "Qwen3-32B": Shape(5120, 64, 25600, 64, 8, 151936, False, head_dim=128),
    "Llama-3.1-70B": Shape(8192, 80, 28672, 64, 8, 128256, False),
}


def parse_count(text: str) -> int:
    """'8B', '135M', '8e9' or '8000000000' -> a parameter count."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if not match:
        raise SelfMTPError(f"--params: expected a count like 8B, 135M or 8e9, got {text!r}")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    count = int(float(match.group(1)) * scale)
    if count < 1:
        raise SelfMTPError("--params must be positive")
    return count


def shape_for_params(count: int) -> tuple[str, Shape]:
    """The known shape whose parameter count is nearest to `count` (by ratio)."""
    import math

    return min(KNOWN_SHAPES.items(), key=lambda item: abs(math.log(item[1].parameters / count)))


def shape_from_config(config) -> Shape:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return Shape(
        hidden=text.hidden_size, layers=text.num_hidden_layers, intermediate=text.intermediate_size, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, vocab=text.vocab_size,
        tied=bool(getattr(text, "tie_word_embeddings", False)), head_dim=getattr(text, "head_dim", None) or 0,
    )


def shape_for_model(spec: str) -> Shape:
    """The shape of `--model SPEC` from its config alone (tiny: its options; GGUF: the converted config)."""
    from transformers import AutoConfig

    from selfmtp.models.loading import ALIASES, converted_gguf_dir, load_tokenizer, parse_model_spec
    from selfmtp.models.mtp_token import MTP_CONFIG_KEY

    resolved = parse_model_spec(spec)
    if resolved.kind == "tiny":
        o = resolved.options
        vocab = len(load_tokenizer(o["tokenizer"]))
        return Shape(o["hidden"], o["layers"], o["intermediate"], o["heads"], o["kv_heads"], vocab + 1, True)  # + <mtp>
    if resolved.kind == "alias":
        source = ALIASES[resolved.source]()
    elif resolved.kind == "gguf":
        from pathlib import Path

        source = converted_gguf_dir(Path(resolved.source))
    else:
        source = resolved.source
    try:
        config = AutoConfig.from_pretrained(str(source))
    except Exception as exc:  # transformers raises several kinds
        raise SelfMTPError(f"cannot read the config of {spec}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    shape = shape_from_config(config)
    has_mtp = getattr(config, MTP_CONFIG_KEY, None) is not None
    return shape if has_mtp else Shape(**{**asdict(shape), "vocab": shape.vocab + 1})  # + <mtp>


def layout_size(seq_len: int, k_max: int) -> tuple[int, int]:
    """(layout length, supervised positions) of one full-length row with the default regions: each of
    seq_len // (2 k_max) regions inserts k_max masks and supervises k_max positions."""
    from selfmtp.training.layout import default_regions

    regions = default_regions(seq_len, k_max)
    return seq_len + regions * k_max, regions * k_max


def activation_bytes(shape: Shape, *, tokens: int, layout_len: int, supervised: int, dtype: str,
                     checkpointing: bool, lora_rank: int = 0) -> int:
    """Bytes the student's forward saves for backward, for `tokens` layout positions (rows x layout_len)
    and `supervised` logit rows. Per token and decoder layer, in the compute dtype (e bytes):
    10 hidden-size tensors (norm inputs and outputs, q/k before and after RoPE, attention output,
    residuals), 4 intermediate-size ones (gate, its SiLU, up, their product) and the attention mask
    as sdpa keeps it (layout_len per token), plus LoRA's 7 rank-sized adapter outputs. Outside the
    layers: the final norm (3 hidden-size tensors), the float32 log-softmax of the selected logits,
    and with LoRA the head weight peft rebuilds with the trainable `<mtp>` row (vocab x hidden).
    Checkpointing keeps each layer's input and mask, and recomputes one layer at a time in backward.
    Measured against real steps by benchmarks/plan_check.py."""
    e = DTYPE_BYTES[dtype]
    layer = tokens * e * (10 * shape.hidden + 4 * shape.intermediate + layout_len + 7 * lora_rank)
    kept = tokens * e * (shape.hidden + layout_len) if checkpointing else layer
    head = tokens * 3 * e * shape.hidden + 4 * supervised * shape.vocab
    if lora_rank:
        head += 4 * shape.vocab * shape.hidden
    return shape.layers * kept + (layer if checkpointing else 0) + head


@dataclass(frozen=True)
class Plan:
    parallel: str
    checkpointing: bool
    micro_batch: int  # rows per device per forward
    grad_accum: int
    parts: dict  # name -> bytes per device

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.total <= HEADROOM * gpu_memory_gb * GB


def plan_memory(shape: Shape, *, gpus: int, parallel: str, batch_rows: int, seq_len: int, k_max: int = 16,
                lora_rank: int = 0, gated: bool = False, dtype: str = "bfloat16", checkpointing: bool = False,
                grad_accum: int = 1) -> Plan:
    """Bytes per device for one step; `batch_rows` is the global batch (all devices, all micro-batches)."""
    if parallel not in ("ddp", "fsdp"):
        raise SelfMTPError("--parallel must be ddp or fsdp")
    if dtype not in DTYPE_BYTES:
        raise SelfMTPError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}")
    micro = max(1, -(-batch_rows // (gpus * grad_accum)))
    trainable = shape.lora_parameters(lora_rank) if lora_rank else shape.parameters
    share = gpus if parallel == "fsdp" else 1
    layout_len, supervised = layout_size(seq_len, k_max)
    e = DTYPE_BYTES[dtype]
    parts = {
        "weights": 4 * (shape.parameters + (trainable if lora_rank else 0)) // share,  # LoRA adds its adapters
        "gradients": 4 * trainable // share * (2 if parallel == "ddp" and gpus > 1 else 1),
        "optimizer": 8 * trainable // share,
        "teacher": 0 if lora_rank or gated else 4 * shape.parameters // share,
        "transient": 0,
        "activations": activation_bytes(shape, tokens=micro * layout_len, layout_len=layout_len,
                                        supervised=micro * supervised, dtype=dtype, checkpointing=checkpointing,
                                        lora_rank=lora_rank),
    }
    if parallel == "fsdp":
        gathered = e * (shape.root_parameters + 2 * shape.layer_parameters)
        parts["transient"] = gathered + 4 * shape.layer_parameters * (0 if lora_rank else 1)
    elif dtype == "bfloat16":
        parts["transient"] = 2 * trainable  # autocast caches bf16 copies of the weights that take gradients
    return Plan(parallel, checkpointing, micro, grad_accum, parts)


def candidate_plans(shape: Shape, *, gpus: int, batch_rows: int, **settings) -> list[Plan]:
    """DDP and FSDP, each without and with activation checkpointing, at one micro-batch."""
    return [plan_memory(shape, gpus=gpus, parallel=parallel, batch_rows=batch_rows, checkpointing=ckpt, **settings)
            for parallel in ("ddp", "fsdp") for ckpt in (False, True)]


def choose(shape: Shape, *, gpus: int, gpu_memory_gb: float, batch_rows: int, parallel: str | None = None,
           **settings) -> Plan | None:
    """The fastest plan that fits: DDP before FSDP (no sharding traffic), no checkpointing before
    checkpointing (no recompute), then more gradient accumulation (smaller micro-batches)."""
    parallels = [parallel] if parallel else ["ddp", "fsdp"]
    accum = 1
    while True:
        for par in parallels:
            for ckpt in (False, True):
                plan = plan_memory(shape, gpus=gpus, parallel=par, batch_rows=batch_rows, checkpointing=ckpt,
                                   grad_accum=accum, **settings)
                if plan.fits(gpu_memory_gb):
                    return plan
        if plan.micro_batch == 1:
            return None
        accum *= 2


def suggested_command(plan: Plan, *, gpus: int, model: str, seq_len: int, lora_rank: int, gated: bool,
                      dtype: str) -> str:
    launcher = f"torchrun --nproc_per_node {gpus} -m selfmtp" if gpus > 1 else "selfmtp"
    parts = [launcher, "train", "--model", model, "--data DATA.jsonl", "--device cuda",
             f"--parallel {plan.parallel}", f"--dtype {dtype}", f"--batch-size {plan.micro_batch}",
             f"--grad-accum {plan.grad_accum}", f"--seq-len {seq_len}"]
    if plan.checkpointing:
        parts.append("--activation-checkpointing")
    if lora_rank:
        parts.append(f"--lora-rank {lora_rank}")
    if gated:
        parts.append("--gated")
    return " ".join(parts)


def format_table(plans: list[Plan], gpu_memory_gb: float) -> str:
    names = list(plans[0].parts)
    header = f"{'per device (GB)':<26}" + "".join(f"{name:>12}" for name in names) + f"{'total':>10}  fits"
    lines = [header]
    for plan in plans:
        label = f"{plan.parallel}{' + act. ckpt' if plan.checkpointing else ''} (micro {plan.micro_batch})"
        cells = "".join(f"{plan.parts[name] / GB:>12.2f}" for name in names)
        lines.append(f"{label:<26}{cells}{plan.total / GB:>10.2f}  {'yes' if plan.fits(gpu_memory_gb) else 'no'}")
    return "\n".join(lines)


def plan_report(*, model: str | None, params: str | None, gpus: int, gpu_memory_gb: float, batch_rows: int,
                seq_len: int, k_max: int = 16, lora_rank: int = 0, gated: bool = False, parallel: str | None = None,
                dtype: str = "bfloat16") -> dict:
    """Everything `selfmtp plan` prints, JSON-able."""
    if (model is None) == (params is None):
        raise SelfMTPError("give --model SPEC or --params N (not both)")
    if gpus < 1 or gpu_memory_gb <= 0 or batch_rows < 1 or seq_len < 2 or k_max < 1 or lora_rank < 0:
        raise SelfMTPError("--gpus, --gpu-memory, --batch-size, --seq-len, --k-max must be positive, --lora-rank >= 0")
    if params is not None:
        name, shape = shape_for_params(parse_count(params))
    else:
        name, shape = model, shape_for_model(model)
    settings = dict(seq_len=seq_len, k_max=k_max, lora_rank=lora_rank, gated=gated, dtype=dtype)
    plans = candidate_plans(shape, gpus=gpus, batch_rows=batch_rows, **settings)
    if parallel:
        plans = [plan for plan in plans if plan.parallel == parallel]
    chosen = choose(shape, gpus=gpus, gpu_memory_gb=gpu_memory_gb, batch_rows=batch_rows, parallel=parallel, **settings)
    as_dict = lambda plan: {**asdict(plan), "total": plan.total, "fits": plan.fits(gpu_memory_gb)}  # noqa: E731
    return {
        "model": name, "shape": asdict(shape), "parameters": shape.parameters,
        "trainable": shape.lora_parameters(lora_rank) if lora_rank else shape.parameters,
        "gpus": gpus, "gpu_memory_gb": gpu_memory_gb, "usable_fraction": HEADROOM, "batch_rows": batch_rows, **settings,
        "plans": [as_dict(plan) for plan in plans],
        "chosen": as_dict(chosen) if chosen else None,
        "command": suggested_command(chosen, gpus=gpus, model=model or "MODEL", seq_len=seq_len, lora_rank=lora_rank,
                                     gated=gated, dtype=dtype) if chosen else None,
    }


def format_report(report: dict) -> str:
    plans = [Plan(p["parallel"], p["checkpointing"], p["micro_batch"], p["grad_accum"], p["parts"])
             for p in report["plans"]]
    lines = [
        f"{report['model']}: {report['parameters'] / 1e9:.2f}B parameters, {report['trainable'] / 1e9:.3f}B trainable; "
        f"{report['gpus']} x {report['gpu_memory_gb']:g} GB (planned to {report['usable_fraction']:.0%}), "
        f"global batch {report['batch_rows']} x {report['seq_len']} tokens, {report['dtype']}",
        format_table(plans, report["gpu_memory_gb"]),
    ]
    chosen = report["chosen"]
    if chosen is None:
        lines.append("nothing fits, even one row per device with activation checkpointing: use more or larger "
                     "devices, or LoRA (--lora-rank)")
    else:
        lines.append(f"fits: {chosen['parallel']}{' + activation checkpointing' if chosen['checkpointing'] else ''}, "
                     f"micro-batch {chosen['micro_batch']} x grad-accum {chosen['grad_accum']} per device, "
                     f"{chosen['total'] / GB:.1f} GB per device")
        lines.append(f"suggested: {report['command']}")
    return "\n".join(lines)
