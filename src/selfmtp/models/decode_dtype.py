"""`--dtype auto`: the decode dtype chosen by timing this machine's matmul kernels, not by assuming.

On a GPU, auto is float32, measured on an H200 (docs/measurements/smollm2-135m-mtp-gpu): in bf16, exact
`verify` needs the batch-invariant kernels (models/exact_kernels.py), which are CPU designs (one attention call
per query) and made bf16 NTP 0.46x and a bf16 eval ~30x slower than float32 there, while float32 with stock
kernels gave verify's output identical to greedy on 200/200 GSM8K dev problems for three models.
`--dtype bfloat16` stays available (exact, slow on a GPU until GPU-native batch-invariant kernels exist).
On a CPU it times the model's two matmul shapes
that dominate a pass (hidden x intermediate, and the output head hidden x vocab) for 1 and 8 rows in
float32 and in bfloat16. It takes bfloat16 where a pass of 8 tokens is clearly cheaper in it
(BF16_MUST_SAVE_AT_8) and a pass of 1 is not clearly dearer (BF16_MAY_COST_AT_1): multi-token passes are
what this project's strategies run, and NTP must not pay much for them. Measured (docs/measurements/
decode-dtype-cpu): on an AMD EPYC with AVX512-BF16, bf16 matmuls were 0.78x float32's at 1 row and 0.30x
at 8; on an Intel Xeon with AMX, 0.96x and 0.29x (float32's 1-row GEMV is fast there, so bf16 NTP is no
faster, but 8-token passes cost 1.1x a 1-token pass instead of 2.2x); without native bf16 the kernels are
emulated and slower than float32. bf16 is timed as it decodes: with oneDNN-packed weights where this torch
has them (models/prepack.py; packing is the default for bf16 on a CPU). The choice and its timings are printed
and recorded in results.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from selfmtp.errors import SelfMTPError
from selfmtp.models.prepack import PrepackedLinear, prepack_available, prepack_linears

BF16_MUST_SAVE_AT_8 = 0.7  # bf16 8-row matmuls must cost at most this fraction of float32's
BF16_MAY_COST_AT_1 = 1.15  # and 1-row ones at most this multiple (noise on a shared machine is ~10%)
TIMED_CALLS = 7


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "float32" | "bfloat16"
    reason: str
    timings_ms: dict  # "float32 head 1 row": ms, ...

    def to_dict(self) -> dict:
        return asdict(self)


def choose_decode_dtype(config, device: str | torch.device = "cpu") -> DtypeChoice:
    """The dtype `--dtype auto` decodes in on `device` for a model of this config (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return DtypeChoice("float32", "GPU: float32 (exact bf16 needs batch-invariant kernels that are slow on a GPU; "
                           "docs/measurements/smollm2-135m-mtp-gpu)", {})
    if device.type != "cpu":
        return DtypeChoice("float32", f"no probe for {device.type} devices: float32", {})
    hidden = config.hidden_size
    shapes = {"mlp": (hidden, getattr(config, "intermediate_size", 4 * hidden)), "head": (hidden, config.vocab_size)}
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (k, n) in shapes.items():
            linear = nn.Linear(k, n, bias=False).to(dtype).requires_grad_(False)
            if dtype == torch.bfloat16 and prepack_available():
                linear = PrepackedLinear(linear)  # what bf16 decoding runs (to_decode_dtype's default)
            for rows in (1, 8):
                x = torch.randn(rows, k).to(dtype)
                timings[f"{str(dtype).removeprefix('torch.')} {name} {rows} row{'s' * (rows > 1)}"] = _median_ms(linear, x)
    ratios = [sum(timings[f"bfloat16 {s} {r}"] for s in shapes) / sum(timings[f"float32 {s} {r}"] for s in shapes)
              for r in ("1 row", "8 rows")]  # fmt: skip
    verdict = "bfloat16" if ratios[0] <= BF16_MAY_COST_AT_1 and ratios[1] <= BF16_MUST_SAVE_AT_8 else "float32"
    reason = (f"bf16/fp32 matmul time: {ratios[0]:.2f} at 1 row, {ratios[1]:.2f} at 8 rows "
              f"(bf16 if <= {BF16_MAY_COST_AT_1} and <= {BF16_MUST_SAVE_AT_8})")
    return DtypeChoice(verdict, reason, {key: round(ms, 3) for key, ms in timings.items()})


def _median_ms(linear: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        linear(x)  # warm-up: the first call may allocate
        times = []
        for _ in range(TIMED_CALLS):
            started = time.perf_counter()
            linear(x)
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


DECODE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.bfloat16}


def check_dtype_name(dtype: str | torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) and dtype not in DECODE_DTYPES:
        raise SelfMTPError(f"unknown dtype {dtype!r} (use one of {', '.join(DECODE_DTYPES)})")


def to_decode_dtype(model, dtype: str | torch.dtype, *, device, prepack: bool | None = None,
                    exact_kernels: bool | str = False):  # fmt: skip
    """`model` (float32, just loaded) in `dtype` on `device`, in eval mode: "auto" resolved here, int8 linears
    swapped in, linears prepacked (None: bf16 on a CPU with oneDNN, see models/prepack.py; True: also
    float32; False: never), batch-invariant kernels installed ("auto": in every dtype but float32).
    What was chosen is recorded as `model.selfmtp_decode`."""
    if isinstance(dtype, torch.dtype):
        decode = {"dtype": str(dtype).removeprefix("torch.")}
    elif dtype == "auto":
        choice = choose_decode_dtype(model.config, device)
        decode = {"dtype": choice.dtype, "requested": "auto", "choice": choice.to_dict()}
    else:
        decode = {"dtype": dtype}
    model = model.to(device=device, dtype=TORCH_DTYPES[decode["dtype"]])
    model.eval()
    if decode["dtype"] == "int8":
        from selfmtp.models.int8 import quantize_linears

        quantize_linears(model)
    if prepack is None:
        prepack = torch.device(device).type == "cpu" and decode["dtype"] == "bfloat16" and prepack_available()
    if prepack:
        prepack_linears(model)
    decode["prepacked"] = bool(prepack)
    if exact_kernels == "auto":
        exact_kernels = decode["dtype"] != "float32"
    if exact_kernels:
        from selfmtp.models.exact_kernels import make_decoding_exact

        decode["exact_kernels"] = make_decoding_exact(model).to_dict()
    model.selfmtp_decode = decode
    return model
