"""Using a selfmtp model in plain transformers (docs/using-elsewhere.md).

`generate` is transformers' `generate` contract over selfmtp's decode loop (what a checkpoint's
`custom_generate/generate.py` imports); `export` writes `custom_generate/` into model directories and turns any
`--model` spec into a directory transformers loads (a gated model with `trust_remote_code` model code,
`gated_model`).
"""
