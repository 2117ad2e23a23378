"""Evaluation harness: answer extraction on real GSM8K/BBH data, prompts, sweeps, resume, CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import SHARED_DATA
from selfmtp.cli import main
from selfmtp.errors import SelfMTPError
from selfmtp.evaluation import extract, sweep
from selfmtp.evaluation.report import accuracy_with_stderr
from selfmtp.evaluation.sweep import SweepConfig, run_sweep
from selfmtp.evaluation.tasks import COT_SUFFIX, cot_rationale, load_task

GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"
BBH = SHARED_DATA / "bbh"
needs_data = pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason="../shared/data not present")


def _gsm8k_records():
    return [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Extraction


@needs_data
def test_gsm8k_gold_recovers_every_train_answer():
    records = _gsm8k_records()
    assert len(records) == 7473
    for record in records:
        last_line = record["answer"].strip().splitlines()[-1]
        assert last_line.startswith("#### ")
        expected = last_line[len("#### ") :].strip().replace(",", "")
        gold = extract.gsm8k_gold(record["answer"])
        assert gold == expected
        float(gold)  # always a number


@needs_data
def test_flexible_and_strict_on_cot_outputs_built_from_real_answers():
    for record in _gsm8k_records()[:500]:
        gold = extract.gsm8k_gold(record["answer"])
        output = "\n" + cot_rationale(record["answer"]) + "\n\n"  # what a perfect model writes
        assert extract.strict_match(output) == gold
        assert extract.flexible_extract(output) == gold
        # Without the final sentence strict-match finds nothing; flexible takes the last number.
        body = output.rsplit("The answer is", 1)[0] + f"So she has ${int(float(gold)) + 1:,}."
        assert extract.strict_match(body) is None
        assert extract.flexible_extract(body) == str(int(float(gold)) + 1)


@pytest.mark.parametrize(
    ("text", "flexible", "strict"),
    [
        ("She pays $1,234.50 in total. The answer is 1,234.50.", "1234.50", "1234.50"),
        ("It drops by 7. The answer is -7.", "-7", "-7"),
        ("The answer is 18.\n\nQ: next question 3", "3", "18"),
        ("no digits here.", None, None),
        ("He has 5 apples... and 2.", "2", None),
    ],
)
def test_gsm8k_extraction_cases(text, flexible, strict):
    assert extract.flexible_extract(text) == flexible
    assert extract.strict_match(text) == strict


@needs_data
def test_bbh_extraction_recovers_every_target():
    files = sorted(BBH.glob("*.json"))
    assert len(files) == 27
    total = 0
    for path in files:
        for example in json.loads(path.read_text())["examples"]:
            target = example["target"]
            output = f"Let's see.\nSome reasoning here. So the answer is {target}.\n\nQ: more"
            assert extract.bbh_extract(output) == target, (path.name, target)
            assert extract.bbh_match(extract.bbh_extract(output), target)
            total += 1
    assert total > 6000


def test_bbh_option_matching():
    assert extract.bbh_match("(A)", "(A)")
    assert extract.bbh_match("A", "(A)")
    assert extract.bbh_match("(A) 12/14/1937", "(A)")
    assert not extract.bbh_match("(B)", "(A)")
    assert not extract.bbh_match("A dog", "(A)")
    assert extract.bbh_match("yes", "Yes")
    assert not extract.bbh_match(None, "Yes")
    assert extract.bbh_extract("I think THE ANSWER IS valid.") == "valid"
    assert extract.bbh_extract("no conclusion") is None


def test_stderr_formula():
    assert accuracy_with_stderr([True, False, True, True]) == pytest.approx(
        {"accuracy": 0.75, "stderr": (0.75 * 0.25 / 3) ** 0.5, "n": 4}
    )
    assert accuracy_with_stderr([True])["stderr"] == 0.0


def test_paired_difference_is_the_mean_and_stderr_of_per_item_differences():
    from selfmtp.evaluation.reference import paired_difference

    def outputs(correct):
        return [{"index": i, "scores": {"accuracy": {"correct": c}}} for i, c in enumerate(correct)]

    a, b = [True, True, False, True, False], [True, False, False, False, True]
    diffs = [0, 1, 0, 1, -1]  # a - b by item; the same items, so their shared difficulty cancels
    mean = sum(diffs) / 5
    expected = (sum((d - mean) ** 2 for d in diffs) / 4 / 5) ** 0.5
    assert paired_difference(outputs(a), outputs(b), "accuracy") == pytest.approx(
        {"difference": mean, "stderr": expected, "n": 5})
    assert paired_difference(outputs(a)[:3], outputs(b), "accuracy")["n"] == 3  # only shared items


# ---------------------------------------------------------------------------------------------
# Prompts


@needs_data
def test_gsm8k_fewshot_prompt_and_exemplar_exclusion():
    task = load_task("gsm8k", data=GSM8K_TRAIN, limit=5)
    records = _gsm8k_records()
    assert len(task.exemplars) == 8 and len(task.items) == 5
    exemplar_questions = {r["question"] for r in records[:8]}
    assert all(item.question not in exemplar_questions for item in task.items)
    assert [item.index for item in task.items] == [8, 9, 10, 11, 12]
    prompt = task.prompt(task.items[0])
    assert prompt.count("Q: ") == 9 and prompt.count("The answer is ") == 8
    assert prompt.endswith(f"Q: {task.items[0].question}\nA: {COT_SUFFIX}")
    assert "<<" not in prompt and "####" not in prompt
    assert f"The answer is {extract.gsm8k_gold(records[0]['answer'])}." in prompt
    assert task.stop == ("Q:",)
    # The same exemplars through --fewshot-data remove the overlap from a different items file too.
    from_pool = load_task("gsm8k", data=GSM8K_TRAIN, fewshot_data=GSM8K_TRAIN, limit=2, shots=3)
    assert [item.index for item in from_pool.items] == [3, 4]


@needs_data
def test_gsm8k_chat_prompt_is_multiturn():
    task = load_task("gsm8k", data=GSM8K_TRAIN, limit=1, shots=2, chat=True)
    messages = task.prompt(task.items[0])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"].startswith(task.items[0].question)
    assert messages[1]["content"].endswith("The answer is 72.")
    assert task.stop == ()
    assert len(load_task("gsm8k", data=GSM8K_TRAIN, limit=1, shots=0, chat=True).prompt(task.items[0])) == 1


@needs_data
def test_bbh_prompt():
    task = load_task("bbh:date_understanding", data=BBH, limit=2)
    prompt = task.prompt(task.items[0])
    assert prompt.startswith("Infer the date from context.")
    assert "canary" not in prompt.lower() and "-----" not in prompt
    assert prompt.endswith(f"\n\nQ: {task.items[0].question}\nA: {COT_SUFFIX}")
    assert prompt.count(f"A: {COT_SUFFIX}") == 4  # 3 shots + the question
    target = json.loads((BBH / "date_understanding.json").read_text())["examples"][0]["target"]
    assert task.name == "bbh:date_understanding" and task.items[0].target == target
    assert task.score(f"So the answer is {target}.", task.items[0])["exact_match"]["correct"]


def test_tiny_gsm_prompt_matches_teacher_template():
    from selfmtp.tasks.tiny_gsm import generate_problems
    from selfmtp.tasks.tokenizer import encode_plain, train_tokenizer

    problems = generate_problems(40, seed=0, split="train")
    tokenizer = train_tokenizer([p["question"] + "\n\n" + p["answer"] for p in problems], vocab_size=300)
    task = load_task("tiny-gsm", limit=4, seed=1)
    assert len(task.items) == 4 and task.stop == ()
    for item in task.items:
        assert (
            tokenizer(task.prompt(item, tokenizer))["input_ids"] == encode_plain(tokenizer, item.question)[0]
        )
        assert task.score(f"... so 1 + 2 = 3.\n#### {item.target}", item)["accuracy"]["correct"]
        assert not task.score("#### 100000", item)["accuracy"]["correct"]


# ---------------------------------------------------------------------------------------------
# Sweeps


@pytest.fixture
def tiny_mtp(monkeypatch):
    """Sweeps get their models from here instead of loading one per run: the teacher is the packaged
    tiny-gsm teacher, the student its copy with `<mtp>` and perturbed weights (as after some training),
    so no student-versus-teacher check holds by construction (a random tiny model only echoes its
    input: any two of them write the same text). Returns (student, teacher)."""
    from selfmtp.api import MTPModel
    from selfmtp.models.loading import load_model

    mtp, teacher = MTPModel(*load_model("tiny-gsm-teacher")), MTPModel(*load_model("tiny-gsm-teacher", add_mtp=False))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mtp.model.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=generator))
    monkeypatch.setattr(sweep, "_load_model", lambda run, config: teacher if run.label == "teacher" else mtp)
    return mtp, teacher


def _config(**overrides) -> SweepConfig:
    base = dict(model="tiny", task="tiny-gsm", limit=3, max_new_tokens=8, batch_size=2)
    return SweepConfig(**{**base, **overrides})


def test_sweep_writes_results(tiny_mtp, tmp_path):
    config = _config(strategies=["static:1", "static:2", "confadapt:0.9"], teacher="tiny", max_new_tokens=16)
    results = run_sweep(config, tmp_path, progress=False)
    assert [r["strategy"] for r in results["rows"]] == ["teacher", "static:1", "static:2", "confadapt:0.9:16"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(results["rows"]))
    assert on_disk["task"] == "tiny-gsm" and on_disk["model"] == "tiny" and "stderr_formula" in on_disk
    rows = {r["strategy"]: r for r in results["rows"]}
    for row in rows.values():
        assert row["n"] == 3 and 0.0 <= row["accuracy"] <= 1.0 and row["stderr"] >= 0.0
        assert row["tokens_per_second"] > 0 and row["acceleration_std"] >= 0
        assert set(row) >= {"strategy", "accuracy", "stderr", "acceleration_mean", "acceleration_std", "n"}
    assert rows["static:1"]["acceleration_mean"] == 1.0 and rows["teacher"]["kind"] == "teacher"
    assert all(row["decode"]["dtype"] == "float32" for row in rows.values())  # the decode dtype, recorded
    assert 1.0 < rows["static:2"]["acceleration_mean"] <= 2.0
    assert rows["confadapt:0.9:16"]["tau"] == 0.9 and rows["confadapt:0.9:16"]["k_max"] == 16
    # Per-item outputs: the teacher row is the teacher model's own NTP text, static:1 the student's
    # (the same calls as the sweep makes, so no float noise between them), and the two differ.
    student, teacher_model = tiny_mtp
    task = load_task("tiny-gsm", limit=3)
    prompts = [task.prompt(item, student.tokenizer) for item in task.items]
    decode = dict(max_new_tokens=16, chat=False, batch_size=2)
    teacher = json.loads((tmp_path / "runs" / "teacher.json").read_text())["outputs"]
    static1 = json.loads((tmp_path / "runs" / "static_1.json").read_text())["outputs"]
    assert [o["output"] for o in teacher] == [r.text for r in teacher_model.generate(prompts, strategy="ntp", **decode)]
    assert [o["output"] for o in static1] == [r.text for r in student.generate(prompts, strategy="static:1", **decode)]
    assert [o["output"] for o in teacher] != [o["output"] for o in static1]
    assert all(o["num_tokens"] == sum(1 for _ in o["chunks"]) for o in static1)
    markdown = (tmp_path / "results.md").read_text()
    assert "| static k=2 |" in markdown and "teacher" in markdown and "ConfAdapt tau=0.9" in markdown
    # pooled tokens per pass and token identity with static k=1, each against the per-item outputs
    static2 = json.loads((tmp_path / "runs" / "static_2.json").read_text())["outputs"]
    pooled = sum(o["num_tokens"] for o in static2) / sum(o["forward_passes"] for o in static2)
    assert rows["static:2"]["tokens_per_pass_pooled"] == pytest.approx(pooled)
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(static2, static1, strict=True))
    assert (rows["static:2"]["identical_to_static_1"], rows["static:2"]["identical_of"]) == (same, 3)
    agree = [a["scores"]["accuracy"]["extracted"] == b["scores"]["accuracy"]["extracted"] for a, b in zip(static2, static1, strict=True)]
    assert rows["static:2"]["answer_agreement_static_1"] == pytest.approx(sum(agree) / 3)
    assert "identical_to_static_1" not in rows["static:1"] and "| same tokens as static k=1 |" in markdown
    assert "tokens/pass (pooled)" in markdown and "effective k" in markdown
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_records_what_dtype_auto_chose_and_why(tmp_path):
    """`--dtype auto` is a measured choice per machine: results.json and results.md say which dtype decoded."""
    results = run_sweep(_config(strategies=["static:1"], limit=1, dtype="auto"), tmp_path, progress=False)
    decode = results["rows"][0]["decode"]
    assert decode["requested"] == "auto" and decode["dtype"] in ("float32", "bfloat16") and decode["choice"]["reason"]
    assert f"decode dtype of tiny: {decode['dtype']} (--dtype auto: " in (tmp_path / "results.md").read_text()


def test_sweep_resumes_after_a_crash(tiny_mtp, tmp_path, monkeypatch):
    import os

    ran = []
    real_run_strategy, real_replace = sweep.run_strategy, os.replace

    def crash_while_saving_static_2(src, dst):
        if os.path.basename(dst) == "static_2.json":  # its temp file is written, not yet renamed
            assert os.path.getsize(src) > 0
            raise RuntimeError("killed mid-write")
        real_replace(src, dst)

    monkeypatch.setattr(sweep, "run_strategy", lambda *a, **k: (ran.append(a[2].label), real_run_strategy(*a, **k))[1])
    monkeypatch.setattr(os, "replace", crash_while_saving_static_2)
    with pytest.raises(RuntimeError, match="mid-write"):
        run_sweep(_config(strategies=["static:1", "static:2"]), tmp_path, progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    kept = json.loads((tmp_path / "results.json").read_text())
    assert [r["strategy"] for r in kept["rows"]] == ["static:1"]
    assert os.listdir(tmp_path / "runs") == ["static_1.json"]  # no half-written temporary, no static_2

    results = run_sweep(_config(strategies=["static:1", "static:2"]), tmp_path, progress=False)
    assert ran == ["static:1", "static:2", "static:2"]  # static:1 was not run again
    assert [r["strategy"] for r in results["rows"]] == ["static:1", "static:2"]
    run_sweep(_config(strategies=["static:2"]), tmp_path, progress=False)
    assert len(ran) == 3  # everything finished: nothing to run

    with pytest.raises(SelfMTPError, match="different run"):
        run_sweep(_config(strategies=["static:1"], max_new_tokens=4), tmp_path, progress=False)


def test_plan_runs_validates_before_loading():
    with pytest.raises(SelfMTPError, match="unknown strategy"):
        sweep.plan_runs(_config(strategies=["static:1", "fast"]))
    with pytest.raises(SelfMTPError, match="--teacher"):
        sweep.plan_runs(_config(strategies=["teacher"]))
    runs = sweep.plan_runs(_config(strategies=["static:1", "ntp", "static:1", "teacher"], teacher="t"))
    assert [r.label for r in runs] == ["teacher", "static:1", "ntp"]


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "mmlu"], "unknown task 'mmlu'"),
        (["--task", "gsm8k"], "gsm8k needs --data PATH"),
        (["--task", "gsm8k", "--data", "/nonexistent/gsm8k.jsonl"], "cannot read data file /nonexistent/gsm8k.jsonl"),
        (["--task", "bbh:not_a_task", "--data", str(BBH)], "bbh:not_a_task"),
        (["--task", "tiny-gsm", "--strategies", "static:0"], "static k must be an integer >= 1, got 0"),
        (["--task", "tiny-gsm", "--strategies", "confadapt:abc"], "must be a number, got 'abc'"),
        (["--task", "tiny-gsm", "--chat"], "tiny-gsm has no chat mode"),
        (["--task", "tiny-gsm", "--limit", "0"], "--limit must be >= 1, got 0"),
        (["--task", "tiny-gsm", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    ],
)
def test_cli_user_errors_exit_2(args, message, tmp_path, capsys):
    assert main(["eval", "--model", "tiny", "--output", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfmtp: error: ") and "\n" not in err and message in err, err


def test_cli_eval_runs_and_prints(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny", "--task", "tiny-gsm", "--limit", "2", "--strategies", "static:1,static:3",
            "--max-new-tokens", "6", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # accuracy, paired difference vs k=1, same tokens as k=1, tokens/pass per-generation mean and pooled
    assert re.search(r"\| static k=3 \| \d+\.\d \+- \d+\.\d \| [+-]\d+\.\d \+- \d+\.\d \| [0-2]/2 \| [123]\.\d\dx \+- \d\.\d\d \| "
                     r"[123]\.\d\dx \|", printed)
    assert main([*argv, "--json"]) == 0  # resumed: both strategies already finished
    results = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in results["rows"]] == ["static:1", "static:3"]
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "pareto.png", "runs"}


def test_token_nll_matches_one_forward_per_prefix(tiny):
    from selfmtp.evaluation.reference import token_nll

    model, _ = tiny
    prompt, output = [1, 17, 230, 45], [88, 91, 4000, 12]
    expected = []
    with torch.no_grad():
        for t in range(len(output)):  # independent: a separate full forward for every prefix
            logits = model(input_ids=torch.tensor([prompt + output[:t]])).logits[0, -1]
            expected.append(float(-torch.log_softmax(logits, -1)[output[t]]))
    assert token_nll(model, prompt, output) == pytest.approx(expected, abs=1e-4)


def test_sweep_reports_agreement_and_coherence_against_the_teacher(tiny_mtp, tmp_path):
    """The teacher is another model: agreement and teacher NLL of each row are checked against
    independent computations from the stored outputs (a random model: no claim about accuracy)."""
    _, teacher = tiny_mtp
    config = _config(strategies=["static:1", "static:2"], teacher="tiny", coherence=True, max_new_tokens=12)
    rows = {r["strategy"]: r for r in run_sweep(config, tmp_path, progress=False)["rows"]}
    runs = {label: json.loads((tmp_path / "runs" / f"{name}.json").read_text())["outputs"]
            for label, name in (("teacher", "teacher"), ("static:1", "static_1"), ("static:2", "static_2"))}
    task = load_task("tiny-gsm", limit=3)
    from selfmtp.tasks.pretrain_teacher import answer_number  # how tiny-gsm answers are read

    teacher_answers = [answer_number(o["output"]) for o in runs["teacher"]]
    for label, outputs in runs.items():
        answers = [answer_number(o["output"]) for o in outputs]
        assert rows[label]["answer_agreement"] == sum(a == b for a, b in zip(answers, teacher_answers, strict=True)) / 3
        nll, count = 0.0, 0  # the teacher's summed cross-entropy of each stored text, one forward per item
        for item, output in zip(task.items, outputs, strict=True):
            prompt = teacher.encode(task.prompt(item, teacher.tokenizer), chat=False)
            ids = torch.tensor([prompt + output["token_ids"]])
            labels = ids.clone()
            labels[0, : len(prompt)] = -100
            with torch.no_grad():
                nll += float(teacher.model(input_ids=ids, labels=labels).loss) * len(output["token_ids"])
            count += len(output["token_ids"])
        # float32 log-softmax over 49k logits, summed over 12 tokens: ~1e-6 relative noise
        assert rows[label]["teacher_nll_per_token"] == pytest.approx(nll / count, rel=1e-5)
        assert rows[label]["teacher_nll_tokens"] == count == sum(o["num_tokens"] for o in outputs)
    # The teacher's own greedy text is the likeliest under it; the student's text is not.
    assert rows["teacher"]["teacher_nll_per_token"] < rows["static:1"]["teacher_nll_per_token"]
    stored = json.loads((tmp_path / "runs" / "static_2.json").read_text())["row"]
    assert stored["teacher_nll_per_token"] == rows["static:2"]["teacher_nll_per_token"]  # kept for reruns
    assert "agreement with teacher" in (tmp_path / "results.md").read_text()
    for label in ("static:1", "static:2"):  # paired differences over the same 3 items: of the accuracies
        assert rows[label]["vs_teacher"] == pytest.approx(rows[label]["accuracy"] - rows["teacher"]["accuracy"])
    assert rows["static:2"]["vs_teacher"] == pytest.approx(rows["static:2"]["accuracy"] - rows["teacher"]["accuracy"])
    assert "vs_static_1" not in rows["static:1"] and "vs_static_1" in rows["static:2"]
    assert "| vs static k=1 (points) | vs teacher (points) |" in (tmp_path / "results.md").read_text()
    with pytest.raises(SelfMTPError, match="--coherence needs --teacher"):
        run_sweep(_config(coherence=True), tmp_path / "other", progress=False)


def test_results_files_get_the_usual_mode_not_tempfiles_private_one(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    from selfmtp.files import atomic_dir_write, current_umask, write_json_atomic

    write_json_atomic(tmp_path / "r.json", {"a": 1})
    def write(directory):
        (directory / "x").write_text("x")
        (directory / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(directory / "sub" / "w.safetensors"))  # safetensors writes 0600

    atomic_dir_write(tmp_path / "ckpt", write)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~current_umask()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["sub", "x"]
    for name in ("x", "sub/w.safetensors"):
        assert (tmp_path / "ckpt" / name).stat().st_mode & 0o777 == 0o666 & ~current_umask(), name


def test_exact_rows_are_named_by_all_their_options():
    from selfmtp.evaluation.report import display_name

    names = [display_name({"strategy": s, "kind": "verify", "k_max": 8})
             for s in ("verify:8", "verify:8:tree", "verify:8:lookup", "verify:8:tree:lookup")]  # fmt: skip
    assert names == ["exact K=8", "exact tree K=8", "exact K=8 + lookup", "exact tree K=8 + lookup"]
