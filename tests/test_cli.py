"""The command line as a whole: --no-progress on every subcommand that draws bars or loads a model."""

from __future__ import annotations

import huggingface_hub.utils
import pytest
from transformers.utils import logging as hf_logging

from selfmtp.cli import build_parser, main


@pytest.mark.parametrize("command", ["demo", "train", "generate", "serve", "eval", "bench"])
def test_every_model_loading_subcommand_takes_no_progress(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "--no-progress" in capsys.readouterr().out


def library_bars_on() -> tuple[bool, bool]:
    """Whether transformers' and huggingface_hub's progress bars are on."""
    return hf_logging.is_progress_bar_enabled(), not huggingface_hub.utils.are_progress_bars_disabled()


def set_library_bars(transformers_on: bool, hub_on: bool) -> None:
    (hf_logging.enable_progress_bar if transformers_on else hf_logging.disable_progress_bar)()
    (huggingface_hub.utils.enable_progress_bars if hub_on else huggingface_hub.utils.disable_progress_bars)()


@pytest.fixture
def library_bars():
    """The library bars on for the test, then as they were (--no-progress turns them off process-wide)."""
    before = library_bars_on()
    set_library_bars(True, True)
    yield library_bars_on
    set_library_bars(*before)


def test_generate_no_progress_silences_the_loading_bars(library_bars, capsys):
    argv = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "Tom has 3 apples.",
        "--max-new-tokens",
        "2",
        "--no-chat",
    ]
    assert main(argv) == 0 and library_bars() == (True, True)
    assert main([*argv, "--no-progress"]) == 0 and library_bars() == (False, False)


def test_eval_no_progress_draws_no_bar(library_bars, tmp_path, capsys):
    argv = ["eval", "--model", "tiny", "--task", "tiny-gsm", "--limit", "1", "--strategies", "ntp",
            "--max-new-tokens", "2", "--json"]  # fmt: skip
    assert main([*argv, "--output", str(tmp_path / "a")]) == 0
    assert "1/1" in capsys.readouterr().err  # the strategy's bar (a plain line: stderr is no terminal here)
    assert main([*argv, "--output", str(tmp_path / "b"), "--no-progress"]) == 0
    assert capsys.readouterr().err == "" and library_bars() == (False, False)


def test_no_progress_also_silences_the_gguf_conversion_bar(library_bars):
    # transformers draws the GGUF conversion bar with tqdm.auto directly, past its own progress switch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from selfmtp.models.loading import gguf_conversion_bar_follows_transformers

    original = gguf_utils.tqdm
    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        with gguf_conversion_bar_follows_transformers():
            bar = gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")
            assert bar.disable is not enabled
            bar.close()
        assert gguf_utils.tqdm is original
