"""Shared fixtures. Tests use the `tiny` model spec; a converted-model cache is shared per session.

Isolation: the whole session uses a private SELFMTP_CACHE (set in `pytest_configure`, before anything
resolves the cache, and inherited by CLI subprocesses), so the suite never writes to the user's
~/.cache/selfmtp. Session-wide models are handed out through fixtures that check, after every test,
that the test left them as it found them: tests pass in any order (`-p random_order --random-order`).
"""

from __future__ import annotations

import faulthandler
import gc
import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch

# Repository layout: ../shared/data holds GSM8K and BBH (read-only) beside the checkout.
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"

# The smallest top-1 minus top-2 logit gap a token-for-token comparison may rest on. Float32 logits
# of the test models (magnitude <= ~30) differ between CPUs, thread counts and kernels (batched,
# cached, padded) by ~1e-5 at most (3.1e-5 seen on SmolLM2 across machines); a gap 30x that cannot be
# flipped by float noise, so a test whose decisions all clear it gives the same tokens on any machine.
DECISIVE_MARGIN = 1e-3


def gsm8k_style_lines(n: int) -> str:
    """The first n GSM8K train records when ../shared/data is there, else n tiny-gsm problems: the
    same {"question", "answer" ending in "#### N"} records, so training tests run from any checkout."""
    if GSM8K_TRAIN.exists():
        return "".join(GSM8K_TRAIN.read_text().splitlines(keepends=True)[:n])
    import json

    from selfmtp.tasks.tiny_gsm import generate_problems

    return "".join(json.dumps(p) + "\n" for p in generate_problems(n, seed=0, split="train"))


def top2_margin(logits: torch.Tensor) -> float:
    """The smallest top-1 minus top-2 gap over the rows of `logits` (..., vocab)."""
    top = logits.float().topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def assert_decisive(logits: torch.Tensor, what: str = "greedy choice") -> None:
    """Fail loudly (instead of by float noise on some other CPU) when an argmax is a near tie."""
    margin = top2_margin(logits)
    assert margin > DECISIVE_MARGIN, f"{what} is a near tie (top-2 gap {margin:.2e}): pick another prompt"


# ---------------------------------------------------------------------------------------------
# Training runs of the tiny model (test_train, test_gated, test_train_fsdp, test_crash_paths)

# A few seconds a run on one core: short rows, k_max 4, no evaluation or checkpoints unless asked.
TINY_TRAIN = dict(model="tiny", template="plain", seq_len=64, k_max=4, batch_size=4, steps=4, lr=3e-3, warmup=0,
                  eval_every=0, save_every=0, progress=False)  # fmt: skip


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> str:
    """48 GSM8K-style training records as jsonl. Shared by the session: a test that changes it uses a copy."""
    path = tmp_path_factory.mktemp("data") / "gsm8k-48.jsonl"
    path.write_text(gsm8k_style_lines(48))
    return str(path)


def tiny_train_config(data: str, out: Path, **overrides):
    """A TrainConfig of TINY_TRAIN writing to `out`; `overrides` are TrainConfig fields."""
    from selfmtp.training.config import TrainConfig

    return TrainConfig(**{"data": data, "output": str(out), **TINY_TRAIN, **overrides})


def metrics(out: Path) -> list[dict]:
    """A finished run's metrics.jsonl rows."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


# Weights after 2-3 steps trained the same way in other batch splits (accumulation, DDP, FSDP): float32 sums in
# another order. Seen up to 1.05e-5 on an Intel Xeon in the full suite (under 1e-5 alone); a wrong gradient or
# a lost step moves a weight by ~lr x grad >= 1e-3, so 3e-5 still separates the two by 30x.
SPLIT_BATCH_ATOL = 3e-5


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= atol


def ddp_worker(rank: int, world: int, port: int, cfg) -> None:
    """One process of a `torch.multiprocessing.spawn`ed CPU DDP (gloo) run of `cfg`, as torchrun would start it."""
    from selfmtp.training.trainer import train

    faulthandler.register(signal.SIGUSR1)  # run_ddp's deadline asks every process for its stack
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    _check_group_outlives_its_holders()
    train(cfg)


def _check_group_outlives_its_holders() -> None:
    """Fail a run whose DDP or FSDP modules are still alive when the trainer destroys the process group: they hold
    the group in C++, and a group whose last holder is one of them is destroyed under the GIL, where gloo's
    destructor can deadlock with its own worker threads (trainer._destroy_process_group)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    destroy = dist.destroy_process_group

    def checked(*args, **kwargs):
        gc.collect()
        holders = [type(o).__name__ for o in gc.get_objects()
                   if isinstance(o, (torch.nn.parallel.DistributedDataParallel, FSDPModule))]  # fmt: skip
        assert not holders, f"process group destroyed while {holders} still hold it"
        return destroy(*args, **kwargs)

    dist.destroy_process_group = checked


# A 2-step tiny run takes ~10 s quiet and ~60 s beside a training job; a run past this is stuck (e.g. a
# collective one process never joins) and must fail the test, not hang the suite until CI's cap.
DDP_DEADLINE_S = 600


def run_ddp(cfg, world: int = 2, deadline_s: float = DDP_DEADLINE_S) -> None:
    """`cfg` trained by `world` spawned processes (ddp_worker). Past the deadline, every process prints its
    Python stack to stderr (shown in the failure report) and is killed, and the test fails."""
    context = torch.multiprocessing.spawn(ddp_worker, args=(world, free_port(), cfg), nprocs=world, join=False)
    started = time.monotonic()
    while not context.join(timeout=5):  # raises if a process failed
        if time.monotonic() - started > deadline_s:
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGUSR1)
            time.sleep(2)
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world}-process run still going after {deadline_s} s: stuck (stacks above)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config):
    # Quiet on 2 cores; OMP_NUM_THREADS, when set, decides (the suite must pass with 1 and with 2).
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else max(1, min(2, os.cpu_count() or 1)))
    cache = tempfile.mkdtemp(prefix="selfmtp-test-cache-")
    config._selfmtp_test_cache = (cache, os.environ.get("SELFMTP_CACHE"))
    os.environ["SELFMTP_CACHE"] = cache


def pytest_unconfigure(config):
    cache, before = getattr(config, "_selfmtp_test_cache", (None, None))
    if cache is None:
        return
    shutil.rmtree(cache, ignore_errors=True)
    if before is None:
        os.environ.pop("SELFMTP_CACHE", None)
    else:
        os.environ["SELFMTP_CACHE"] = before


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


# Config fields `save_pretrained` records on the model it saves: no change to what the model computes.
FILLED_IN_BY_SAVE_PRETRAINED = {"architectures", "dtype", "transformers_version"}


def _fingerprint(model, tokenizer) -> tuple:
    """What a test could change on a shared model: weights, requires_grad, train/eval mode, vocab."""
    # The bytes themselves, hashed: a float sum would depend on the thread count that reduces it (a test
    # may change torch's threads), and would miss changes that cancel out.
    with torch.no_grad():
        weights = tuple(hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                        for p in model.parameters())
    flags = tuple(p.requires_grad for p in model.parameters())
    modes = tuple(m.training for m in model.modules())
    config = {k: v for k, v in model.config.to_dict().items() if k not in FILLED_IN_BY_SAVE_PRETRAINED}
    return weights, flags, modes, len(tokenizer), config


@pytest.fixture(scope="session")
def _tiny_session():
    from selfmtp.models.loading import load_model

    model, tokenizer = load_model("tiny", seed=0)
    return model, tokenizer, _fingerprint(model, tokenizer)


@pytest.fixture
def tiny(_tiny_session):
    """(model, tokenizer) of the default `tiny` spec with `<mtp>`, float32, eval mode. Shared by the
    session: a test must not change it (copy it first), and fails if it did."""
    model, tokenizer, before = _tiny_session
    yield model, tokenizer
    assert _fingerprint(model, tokenizer) == before, "this test changed the shared `tiny` model"


@pytest.fixture(scope="session")
def _peaked_session():
    from selfmtp.api import MTPModel
    from selfmtp.models.loading import load_model

    model, tokenizer = load_model("tiny", seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(40.0)
    return MTPModel(model, tokenizer), _fingerprint(model, tokenizer)


@pytest.fixture
def peaked(_peaked_session):
    """`MTPModel` of the tiny model with its final norm scaled up: sharp, varied confidences, so
    ConfAdapt accepts different numbers of tokens per pass (the untrained tiny model is near uniform).
    Shared by the session; a test that changes it fails."""
    mtp, before = _peaked_session
    yield mtp
    assert _fingerprint(mtp.model, mtp.tokenizer) == before, "this test changed the shared `peaked` model"


def load_script(name: str):
    """A module of benchmarks/ (they are not a package): `load_script("plan_check").main(...)`."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_tiny_gsm_student(folder: Path, *, k_max: int) -> str:
    """The packaged tiny-gsm teacher after 60 steps of MTP training (offline targets, lr 1e-2): its train
    `final/` directory. Drafts are often right; how often varies with the CPU and threads it trains at."""
    from selfmtp.tasks.tiny_gsm import generate_problems, write_jsonl
    from selfmtp.training.trainer import TrainConfig, train

    data = write_jsonl(folder / "train.jsonl", generate_problems(200, seed=1))
    summary = train(TrainConfig(
        data=str(data), output=str(folder / "run"), model="tiny-gsm-teacher", template="plain", seq_len=160,
        k_max=k_max, prefix_loss=5.0, supervision="offline", prefix_target="ground-truth", lr=1e-2, warmup=5,
        steps=60, batch_size=8, eval_every=0, save_every=0, seed=0, progress=False,
    ))  # fmt: skip
    return summary["final_dir"]
