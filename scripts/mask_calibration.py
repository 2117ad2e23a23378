"""How honest are a student's mask confidences, and how many borderline ones does ConfAdapt accept?
(An analysis, not a test: the round-3 figures in docs/reproduction.md.)

1. Teacher-forced: held-out tiny-gsm rows get regions of a full block (static k = k_max) at many
   prefix ends, over several seeds. For each chunk position j (1 = the next-token prediction) and
   confidence band: how many predictions, and the share that miss the ground-truth token.
2. Decoded: ConfAdapt(tau) answers to the first problems; per answer, the accepted mask tokens
   (chunk positions j >= 2) in each confidence band.

    PYTHONPATH=src python scripts/mask_calibration.py --model runs/demo/train/final --out calibration.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from selfmtp.api import MTPModel
from selfmtp.evaluation.tasks import load_task
from selfmtp.tasks.tiny_gsm import generate_problems
from selfmtp.training.data import parse_example, tokenize_examples
from selfmtp.training.layout import build_mtp_layout
from selfmtp.training.objective import SelectedLogits

BANDS = ((0.0, 0.9), (0.9, 0.95), (0.95, 0.99), (0.99, 0.999), (0.999, 1.01))


def band_of(confidence: torch.Tensor) -> torch.Tensor:
    edges = torch.tensor([lo for lo, _ in BANDS[1:]])
    return torch.bucketize(confidence, edges, right=True)


@torch.no_grad()
def teacher_forced(model: MTPModel, problems: int, k_max: int, seeds: int) -> list[dict]:
    tok, lm = model.tokenizer, model.model
    examples = [parse_example(p) for p in generate_problems(problems, seed=0, split="test")]
    rows = tokenize_examples(examples, tok, template="plain", seq_len=160)
    mtp = tok.convert_tokens_to_ids("<mtp>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    head, js, bands, wrong = SelectedLogits(lm), [], [], []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        for lo in range(0, len(rows), 50):
            part = rows.take(slice(lo, lo + 50))
            layout = build_mtp_layout(part.input_ids, part.response_start, part.lengths, k_max=k_max, regions=20,
                                      generator=generator, mtp_token_id=mtp, eos_token_id=tok.eos_token_id,
                                      pad_token_id=pad, k_sampling="static", static_k=k_max)  # fmt: skip
            logits = head(layout.input_ids, layout.position_ids, layout.attention_mask, layout.sup_batch, layout.sup_pos)
            logits[:, mtp] = float("-inf")
            confidence, choice = logits.float().softmax(-1).max(-1)
            keep = ~layout.sup_past_eos
            js.append(layout.sup_j[keep])
            bands.append(band_of(confidence[keep]))
            wrong.append((choice != layout.sup_target)[keep])
    js, bands, wrong = torch.cat(js), torch.cat(bands), torch.cat(wrong)
    table = []
    for j in range(1, k_max + 1):
        cells = []
        for b, (lo, hi) in enumerate(BANDS):
            sel = (js == j) & (bands == b)
            n = int(sel.sum())
            cells.append({"band": [lo, min(hi, 1.0)], "n": n, "error": float(wrong[sel].float().mean()) if n else None})
        table.append({"j": j, "n": int((js == j).sum()), "error": float(wrong[js == j].float().mean()), "bands": cells})
    return table


def accepted_bands(model: MTPModel, problems: int, strategy: str) -> dict:
    task = load_task("tiny-gsm", limit=problems)
    counts, tokens, masks = [0] * len(BANDS), 0, 0
    for item in task.items:
        result = model.generate(task.prompt(item, model.tokenizer), strategy=strategy, max_new_tokens=120, chat=False)
        for chunk in result.chunks:
            tokens += len(chunk.token_ids)
            accepted = torch.tensor(chunk.confidences[1:len(chunk.token_ids)], dtype=torch.float)
            masks += accepted.numel()
            for b in band_of(accepted).tolist():
                counts[b] += 1
    n = len(task.items)
    return {"strategy": strategy, "answers": n, "tokens_per_answer": tokens / n, "mask_tokens_per_answer": masks / n,
            "per_answer_by_band": [{"band": [lo, min(hi, 1.0)], "tokens": c / n} for (lo, hi), c in zip(BANDS, counts, strict=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained student (directory or spec)")
    parser.add_argument("--problems", type=int, default=300, help="held-out problems for the teacher-forced table")
    parser.add_argument("--decode-problems", type=int, default=200, help="problems to decode with --strategy")
    parser.add_argument("--strategy", default="confadapt:0.9:8")
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=4, help="region plans per row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = MTPModel.from_pretrained(args.model)
    report = {"model": args.model, "teacher_forced": teacher_forced(model, args.problems, args.k_max, args.seeds),
              "decoded": accepted_bands(model, args.decode_problems, args.strategy)}
    print("| j | accuracy | " + " | ".join(f"[{lo}, {min(hi, 1.0)}): n, error %" for lo, hi in BANDS) + " |")
    for row in report["teacher_forced"]:
        cells = [f"{c['n']}, {100 * c['error']:.2f}" if c["n"] else "0, -" for c in row["bands"]]
        print(f"| {row['j']} | {1 - row['error']:.3f} | " + " | ".join(cells) + " |")
    print(json.dumps(report["decoded"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
