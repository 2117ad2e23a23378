"""The commands shown in README.md and docs/*.md cannot rot: every `selfmtp ...` line in their fenced
code blocks is parsed by the real CLI parser (a renamed flag or subcommand fails here), the cheap ones
are run, and each one that is not run says why (NOT_RUN). Also: README's Python example runs (on the
`tiny` model), every relative link and every benchmarks/ path they name exists, and `make demo` /
`make test` are Makefile targets.

A line ending in `\\` continues on the next; `# ...` comments, shell redirections and `[...]` brackets
around optional flags are dropped (the optional flags are parsed too); `VAR=value` prefixes and
`torchrun ... -m` are dropped; `...` stands for the command's required flags (parsed with ELLIPSIS).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from selfmtp.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ELLIPSIS = ["--model", "tiny", "--data", "train.jsonl", "--output", "runs/x"]

# A command runs when it matches one of these (each cheap on the `tiny` model or with no model at all)...
RUN = {
    "selfmtp generate --model tiny ": "the tiny random model, 256 tokens",
    "selfmtp plan --params ": "arithmetic only, no model",
    "selfmtp train --model tiny ": "run with --steps 2 appended (20 steps: ~15 s of CPU; the flags win from the right)",
}
# ...otherwise it must match one of these, which say why it is only parsed (first match wins).
NOT_RUN = {
    "--device cuda": "needs a GPU",
    "torchrun": "several processes (tests/test_train_fsdp.py runs the FSDP path on 2 CPU processes)",
    "Qwen/": "a hub model: needs the network",
    "selfmtp demo": "minutes of training: `make demo` (tests/test_demo.py runs a tiny demo)",
    "selfmtp prepare": "needs GSM8K's train.jsonl (tests/test_prepare.py runs it on a small file)",
    "selfmtp export": "needs a gated training run or writes a whole model (tests/test_gated.py, test_custom_generate.py)",
    "selfmtp serve": "a server that runs until stopped (tests/test_serve.py)",
    "smollm2": "loads SmolLM2-135M (converts its 270 MB GGUF first; `pytest -m slow` tests cover it)",
    "--plot-only": "reads a training run's metrics.jsonl (tests/test_training_curve.py runs it)",
    "--config recipes/": "a real-model recipe (minutes per step on a CPU)",
    "/models/": "an 8B model on 4 GPUs",
    "CKPT_DIR": "a placeholder for the user's trained model",
    "STUDENT_DIR": "a placeholder for the user's trained model",
    " ...": "an abbreviated command (`...` = its required flags)",
}


def doc_commands() -> list[tuple[str, str]]:
    """(page name, command) for every `selfmtp` line in a fenced code block."""
    found = []
    for page in PAGES:
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", page.read_text(), re.S | re.M):
            lines = block.split("\n")
            while lines:
                line = lines.pop(0)
                while line.rstrip().endswith("\\") and lines:
                    line = line.rstrip()[:-1] + " " + lines.pop(0).strip()
                line = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", line.strip())
                if line.startswith("selfmtp ") or re.match(r"torchrun .* -m selfmtp ", line):
                    found.append((page.name, line))
    return found


def argv_of(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    if ">" in words:
        words = words[: words.index(">")]
    words = words[words.index("selfmtp") + 1 :]
    words = [w.strip("[]") for w in words if w.strip("[]")]
    return [part for w in words for part in (ELLIPSIS if w == "..." else [w])]


COMMANDS = doc_commands()


def test_the_pages_show_commands():
    pages = {page for page, _ in COMMANDS}
    assert {"README.md", "training.md", "decoding.md", "serving.md", "scale-out.md"} <= pages
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_command_parses_and_is_run_or_says_why_not(page, command, tmp_path, monkeypatch, capsys):
    argv = argv_of(command)
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{page}: `{command}` does not parse (status {exc.code}): {capsys.readouterr().err}")
    run = [key for key in RUN if command.startswith(key)]
    if not run:
        reasons = [reason for key, reason in NOT_RUN.items() if key in command]
        assert reasons, f"{page}: `{command}` is neither run nor given a reason in NOT_RUN"
        return
    monkeypatch.chdir(tmp_path)
    if argv[0] == "train":
        from selfmtp.tasks.tiny_gsm import generate_problems, write_jsonl

        write_jsonl(tmp_path / "train.jsonl", generate_problems(32, seed=0))
        argv += ["--steps", "2", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    if "--html" in argv:
        assert (tmp_path / argv[argv.index("--html") + 1]).stat().st_size > 0
    if argv[0] == "train":
        assert (tmp_path / argv[argv.index("--output") + 1] / "final" / "config.json").is_file()


def test_every_subcommand_shown_has_help(capsys):
    for subcommand in sorted({argv_of(command)[0] for _, command in COMMANDS}):
        with pytest.raises(SystemExit) as exit_:
            main([subcommand, "--help"])
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: selfmtp " + subcommand)


def test_readme_python_example_runs_on_the_tiny_model(capsys):
    """The example as shown, with `tiny` for smollm2-135m-mtp (a real model costs a GGUF conversion)."""
    code = re.search(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M).group(1)
    assert '"smollm2-135m-mtp"' in code
    exec(compile(code.replace('"smollm2-135m-mtp"', '"tiny"'), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_links_and_paths_named_in_the_pages_exist():
    missing = []
    for page in [*PAGES, ROOT / "benchmarks" / "README.md", ROOT / "docs" / "measurements" / "README.md"]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):
            if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)}: link {target}")
        for path in re.findall(r"\bbenchmarks/[\w.]+\.(?:py|sh|md)", text):
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert missing == []


def test_the_two_make_commands_are_makefile_targets():
    readme, makefile = (ROOT / "README.md").read_text(), (ROOT / "Makefile").read_text()
    assert re.search(r"```\nmake demo .*\nmake test ", readme)  # at the top, exactly
    assert re.search(r"^demo: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
