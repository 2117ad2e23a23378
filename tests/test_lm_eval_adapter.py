"""The lm-evaluation-harness `selfmtp` model, offline on a task that reads a local jsonl.

lm-eval is an optional extra (`pip install selfmtp[lm-eval]`): without it these tests skip.
"""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from selfmtp.api import MTPModel  # noqa: E402
from selfmtp.evaluation.lm_eval_adapter import SelfMTPLM  # noqa: E402

TASK_YAML = """\
task: selfmtp_local_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Q:"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def mtp():
    from selfmtp.models.loading import load_model

    return MTPModel(*load_model("tiny", seed=0))


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_simple_evaluate_on_a_local_task(mtp, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "arith.jsonl"
    rows = [
        {"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"} for a in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "arith.yaml").write_text(TASK_YAML.format(data=data))
    stats_file = tmp_path / "stats.json"
    lm = SelfMTPLM(pretrained=mtp, strategy="static:2", batch_size=2, stats_file=str(stats_file))
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=lm, tasks=["selfmtp_local_arith"], task_manager=TaskManager(include_path=str(tmp_path)), limit=3
    )
    result, samples = out["results"]["selfmtp_local_arith"], out["samples"]["selfmtp_local_arith"]
    assert len(samples) == 3 and "exact_match_stderr,none" in result
    for sample in samples:  # each answer is what our decoder writes for that prompt with static:2
        ((context, gen_kwargs),) = sample["arguments"]
        mine = mtp.generate(context, strategy="static:2", max_new_tokens=8, stop=["Q:"], chat=False)
        assert sample["resps"] == [[mine.text]] and gen_kwargs["until"] == ["Q:"]
    assert result["exact_match,none"] == sum(s["exact_match"] for s in samples) / 3
    stats = json.loads(stats_file.read_text())
    assert stats["strategy"] == "static:2" and stats["summary"]["generations"] == 3
    assert all(1.0 <= g["acceleration"] <= 2.0 for g in stats["generations"])
    assert all(g["num_tokens"] <= 8 for g in stats["generations"])


def test_registered_under_selfmtp():
    from lm_eval.api.registry import get_model

    assert get_model("selfmtp") is SelfMTPLM


def test_generate_until_ntp_matches_transformers_generate(mtp):
    lm = SelfMTPLM(pretrained=mtp, strategy="ntp")
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    texts = lm.generate_until(_requests("generate_until", [(p, {"max_gen_toks": 6}) for p in prompts]))
    for prompt, text in zip(prompts, texts, strict=True):
        ids = mtp.tokenizer(prompt, return_tensors="pt")["input_ids"]
        reference = mtp.model.generate(
            ids, max_new_tokens=6, do_sample=False, eos_token_id=list(mtp.stop_token_ids)
        )
        assert text == mtp.tokenizer.decode(reference[0, ids.shape[1] :], skip_special_tokens=True)
    assert lm.decoding_stats()["summary"]["acceleration_mean"] == 1.0


def test_loglikelihood_matches_the_model_loss(mtp):
    lm = SelfMTPLM(pretrained=mtp)
    context, continuation = "Natalia sold clips to", " 48 of her friends"
    ((logprob, is_greedy),) = lm.loglikelihood(_requests("loglikelihood", [(context, continuation)]))
    ids = lm.tok_encode(context + continuation)
    n_context = len(lm.tok_encode(context))
    labels = torch.tensor([ids])
    labels[0, :n_context] = -100
    with torch.no_grad():
        loss = mtp.model(input_ids=torch.tensor([ids]), labels=labels).loss
    # float32 log-softmax summed over a few tokens: ~1e-6 relative noise; 1e-4 is far from any off-by-one
    assert logprob == pytest.approx(-loss.item() * (len(ids) - n_context), rel=1e-4)
    with torch.no_grad():
        logits = mtp.model(input_ids=torch.tensor([ids])).logits[0, n_context - 1 : -1]
    assert is_greedy == (logits.argmax(-1).tolist() == ids[n_context:])
    # A continuation the model itself writes greedily is greedy; change its last token and it is not.
    context_ids = lm.tok_encode(context)
    own = mtp.generate(context, strategy="ntp", max_new_tokens=3, chat=False).token_ids
    other = [*own[:-1], (own[-1] + 1) % 1000]
    (_, own_greedy), (_, other_greedy) = lm._loglikelihood_tokens([(None, context_ids, own), (None, context_ids, other)])
    assert own_greedy and not other_greedy


def test_loglikelihood_rolling_is_the_whole_text(mtp):
    lm = SelfMTPLM(pretrained=mtp, max_length=8)  # forces several windows
    text = "one two three four five six seven eight nine ten eleven twelve"
    (total,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    long_lm = SelfMTPLM(pretrained=mtp, max_length=1024)
    (reference,) = long_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    ids = [lm.prefix_token_id, *lm.tok_encode(text, add_special_tokens=False)]
    with torch.no_grad():
        loss = mtp.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert reference == pytest.approx(-loss.item() * (len(ids) - 1), rel=1e-4)  # as above: float32 sums
    assert total < 0 and total != pytest.approx(reference)  # short windows see less context
