"""selfmtp: multi-token prediction via online self-distillation, decoded with ConfAdapt."""

__version__ = "0.1.0"
