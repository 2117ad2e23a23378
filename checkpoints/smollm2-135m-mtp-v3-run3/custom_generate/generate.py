"""Multi-token decoding by selfmtp (`pip install selfmtp`), for transformers:

    model.generate(**inputs, custom_generate=THIS_MODEL_DIR, trust_remote_code=True,
                   strategy="verify:8", max_new_tokens=128)

strategy: "verify[:K]" (default: exact, the model's own greedy output in fewer forward passes),
"confadapt:TAU[:KMAX]", "static:K" or "ntp". Returns what greedy `generate` returns (with
return_dict_in_generate=True also `forward_passes` per row). The decoding is selfmtp's own, imported
below (requirements.txt); docs/using-elsewhere.md in selfmtp says why and what is supported.
"""

from selfmtp.hf.generate import generate  # noqa: F401  (the function transformers calls)
