"""Exact decoding (`verify:K[:tree][:lookup]`): self-speculative, from the same weights, lossless.

An exact row is a row kind of `batch.BatchDecoder`: it shares every pass with the other rows. One
pass feeds, per exact row, the last accepted token, the drafts d_1..d_m as real tokens, and `<mtp>`
mask blocks. The logit at the last token and at each draft is the model's greedy choice g_1..g_m+1
at the next position, so the pass keeps the longest run d_1..d_a with d_i == g_i plus g_a+1 (the
correction, or the bonus after d_m): a+1 tokens, identical to greedy NTP of the same model.

- merged (Stern et al. 2018): one mask block after d_m. If every draft was accepted its proposals
  (the tokens after the bonus) are the next drafts; otherwise the next pass has none.
- tree (BiTA): a block after the last token and after every draft, each block seeing only its own
  prefix (`pass_layout.pass_layout`), so the block after d_a always gives the next drafts.
- lookup: a pass with no mask drafts copies the continuation of the latest earlier occurrence of
  the last n tokens of prompt + output (n = LOOKUP_MAX_NGRAM down to LOOKUP_MIN_NGRAM; cf.
  transformers' prompt lookup decoding, which takes the first occurrence) and verifies it the same way.

Draft cost rule (fed tokens cost time where a pass costs more the more it is fed, e.g. a CPU, or a
busy GPU); none of it changes what is emitted, only what is fed:
- only the leading mask proposals whose confidence is >= DRAFT_MIN_CONFIDENCE become drafts
  (untrained masks are unconfident, so their drafts are never fed);
- a row feeds `width` masks: K-1 at first, 1 after a miss, doubled (up to K-1) after a pass that
  accepted every mask draft. A miss is a pass whose first mask draft was rejected, or whose valid
  mask block proposed nothing confident;
- after MISSES_BEFORE_BACKOFF misses in a row a row feeds no masks (plain NTP passes, or lookup
  drafts) for `backoff` passes, then tries again; each further miss doubles `backoff` (up to
  MAX_BACKOFF), any accepted mask draft resets it;
- DRAFT_MIN_CONFIDENCE 0.5 was chosen by counts on 20 demo-student prompts (tokens/pass 3.87 at
  0.1, 4.37 at 0.5, 4.11 at 0.7: unconfident drafts are the ones that miss) and on SmolLM2-135M
  with untrained masks (fed/pass 1.51 at 0.1, ~1.2 at 0.5; its masks are often > 0.1 confident);
- lookup drafts are at most `lookup_width` long: K-1 at first, doubled after a fully accepted run,
  else the accepted run plus one.

The cache keeps only accepted tokens (batch.py): the mask columns are cropped, rejected drafts too
where every row rejected them; the rest become holes in `key_is_real`, masked like pads (exact).
Near the budget or the context limit a row feeds fewer drafts and masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from selfmtp.decoding.pass_layout import Plan
from selfmtp.decoding.rows import Row, StopRules, take_tokens
from selfmtp.decoding.strategies import Verify

DRAFT_MIN_CONFIDENCE = 0.5
MISS_WIDTH = 1
MISSES_BEFORE_BACKOFF = 2
MAX_BACKOFF = 64
LOOKUP_MAX_NGRAM = 3
LOOKUP_MIN_NGRAM = 2


def prompt_lookup(tokens: list[int], length: int, max_ngram: int = LOOKUP_MAX_NGRAM,
                  min_ngram: int = LOOKUP_MIN_NGRAM) -> list[int]:  # fmt: skip
    """`length` tokens that followed the latest earlier occurrence of the last n tokens; [] if none.

    The longest n (max_ngram down to min_ngram) with an earlier occurrence wins. The copy may run
    into the tail and then continues with what it copied (as LZ77 does), so a loop of period p
    still gives `length` drafts, not p.
    """
    if length < 1:
        return []
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                copied = list(tokens)
                for i in range(length):
                    copied.append(copied[start + n + i])
                return copied[len(tokens) :]
    return []


def confident_run(proposals: list[int], confidences: list[float], threshold: float | None = None) -> list[int]:
    """The leading proposals whose confidences all clear `threshold` (default DRAFT_MIN_CONFIDENCE)."""
    threshold = DRAFT_MIN_CONFIDENCE if threshold is None else threshold
    run = 0
    while run < len(proposals) and confidences[run] >= threshold:
        run += 1
    return proposals[:run]


@dataclass
class ExactRow:
    """An exact row's drafts and cost rule between passes (its tokens live in the `Row` beside it)."""

    strategy: Verify
    prompt: list[int]
    drafts: list[int] = field(default_factory=list)  # fed as real tokens after `pending`, then checked
    from_lookup: bool = False  # the drafts were copied from earlier text, not proposed by masks
    width: int = 0  # masks a drafting pass feeds (set to K-1 in __post_init__)
    lookup_width: int = 0
    misses: int = 0  # mask misses in a row
    backoff: int = 1  # mask-free passes after the next miss
    wait: int = 0  # mask-free passes left before masks are tried again
    drafted: list[int] = field(default_factory=list)  # per pass: accepted drafts among its tokens
    offered: list[int] = field(default_factory=list)  # by draft position: drafts fed
    accepted: list[int] = field(default_factory=list)  # by draft position: drafts accepted
    lookup_offered: int = 0
    lookup_accepted: int = 0
    paid: int = 0  # masks the last pass fed: the draft capacity this pass has
    proposed: int = 1  # this pass: 1 + the draft capacity it paid for (load_aware.LoadAware's stats)

    def __post_init__(self):
        k = self.strategy.k_max
        self.width = self.lookup_width = k - 1
        self.offered, self.accepted = [0] * (k - 1), [0] * (k - 1)

    def plan(self, state: Row, real_count: int, context: int | None) -> Plan:
        """Drafts and masks for this pass, fewer where the budget or the context would not use them.

        `state.k` caps the masks and lookup drafts (k - 1 each; a load-aware row's cap, else K): mask
        drafts are fed whatever it is, since the pass that made them has been paid for.
        """
        left = state.budget - len(state.token_ids)  # tokens this row may still emit (>= 1)
        if not self.drafts and self.strategy.lookup and (self.strategy.tree or self.wait or self.misses):
            self.drafts = prompt_lookup(self.prompt + state.token_ids, min(self.lookup_width, state.k - 1))
            self.from_lookup = bool(self.drafts)
        drafts = self.drafts[: left - 1]  # a pass emits at most drafts + 1 tokens
        self.proposed = 1 + min(max(self.paid, len(drafts)), left - 1)
        last_position = real_count + len(state.pending) + len(drafts) - 1
        n_masks = 0 if self.wait else min(self.width, state.k - 1, left - len(drafts) - 2)  # next drafts fit the budget
        if context is not None:
            n_masks = min(n_masks, context - 1 - last_position)  # positions stay < context
        n_masks = max(n_masks, 0)
        tree = self.strategy.tree
        blocks = (len(drafts) + 1 if tree else 1) if n_masks else 0
        return Plan(state.pending + drafts, len(drafts), blocks, n_masks, tree)

    def accept(self, state: Row, plan: Plan, proposals: torch.Tensor, confidences: torch.Tensor, real_end: int,
               stops: StopRules) -> int:  # fmt: skip
        """Keep the verified run plus the model's own token; set the next drafts; return rejected drafts.

        `real_end`: the index in this row's logits of the column after its last real token.
        """
        state.passes += 1
        state.tokens_fed.append(len(plan.real) + plan.masks)
        drafts = plan.real[len(plan.real) - plan.drafts :]
        checks = slice(real_end - plan.drafts - 1, real_end)
        greedy, greedy_conf = proposals[checks].tolist(), confidences[checks].tolist()
        accepted = Verify.accepted_drafts(drafts, greedy)
        for j in range(plan.drafts):
            self.offered[j] += 1
            self.accepted[j] += int(j < accepted)
        valid = plan.blocks and (plan.tree or accepted == plan.drafts)  # merged: its block follows d_m
        start = real_end + (accepted if plan.tree else 0) * plan.n_masks
        block = slice(start, start + plan.n_masks)
        next_drafts = confident_run(proposals[block].tolist(), confidences[block].tolist()) if valid else []
        self._adapt(plan, accepted, bool(valid), next_drafts)
        self.paid = plan.n_masks
        self.drafts, self.from_lookup = next_drafts, False
        take_tokens(state, greedy[: accepted + 1], greedy_conf[: accepted + 1], stops)
        state.pending = state.pending[-1:]  # the accepted drafts are in the cache already; the own token is not
        self.drafted.append(accepted)
        return plan.drafts - accepted

    def _adapt(self, plan: Plan, accepted: int, valid: bool, next_drafts: list[int]) -> None:
        """The draft cost rule of the module docstring."""
        if self.wait:
            self.wait -= 1
        k = self.strategy.k_max
        if plan.drafts and self.from_lookup:
            self.lookup_offered += plan.drafts
            self.lookup_accepted += accepted
            full = accepted == plan.drafts
            self.lookup_width = min(k - 1, 2 * self.lookup_width) if full else accepted + 1
        elif plan.drafts and accepted:
            self.misses, self.backoff = 0, 1
            if accepted == plan.drafts:
                self.width = min(k - 1, 2 * self.width)
            return
        elif plan.drafts:
            return self._miss()
        if valid and not next_drafts:  # the masks were fed, and proposed nothing worth feeding
            self._miss()

    def _miss(self) -> None:
        self.misses += 1
        self.width = MISS_WIDTH or self.width
        if self.misses >= MISSES_BEFORE_BACKOFF:
            self.wait, self.backoff = self.backoff, min(2 * self.backoff, MAX_BACKOFF)
