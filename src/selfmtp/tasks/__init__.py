"""Procedural tasks (tiny-gsm) and the recipe that pretrains a tiny teacher on them."""

from selfmtp.tasks.tiny_gsm import TinyGSMProblem, generate_problems, generate_tiny_gsm, write_jsonl

__all__ = ["TinyGSMProblem", "generate_problems", "generate_tiny_gsm", "write_jsonl"]
