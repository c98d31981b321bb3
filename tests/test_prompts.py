"""Prompt formats on the tiny model (the chat format on a real tokenizer: test_real_model.py)."""

import pytest

from prefnb import models
from prefnb.config import resolve_params
from prefnb.data import load_task
from prefnb.prompts import PromptFormatError, apply_prompt_format


def test_plain_is_the_task_unchanged_and_chat_needs_a_template(real_data_dir):
    _, tokenizer = models.build_tiny(0)
    task = load_task(resolve_params([("test", {"data_dir": str(real_data_dir), "max_train_examples": 4,
                                                "max_eval_examples": 4})]))
    assert apply_prompt_format(task, tokenizer, "plain") is task
    with pytest.raises(PromptFormatError, match="prompt_format 'chat'.*no chat template.*'plain'"):
        apply_prompt_format(task, tokenizer, "chat")


def test_cli_reports_a_chat_format_without_template_in_one_line(tmp_path, capsys):
    from prefnb.cli import main

    code = main(["train", "--no-progress", "--set", "prompt_format=chat", "--set", "max_steps=1", "--set", "batch_size=2",
                 "--set", "max_train_examples=4", "--set", "max_eval_examples=4",
                 "--set", f"output_dir={tmp_path / 'run'}", "--set", f"cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) >= 1 and "no chat template" in err[-1] and not (tmp_path / "run" / "COMPLETE").exists()
