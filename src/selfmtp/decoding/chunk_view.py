"""Show which tokens came out of the same forward pass (the paper's Figure 1).

Each pass's accepted tokens form one coloured block annotated with its size; the colour grows
warmer with the size, so long confident spans stand out from token-by-token stretches.
`render_terminal` uses ANSI colours; `render_html` writes a standalone page (hover a block for
its confidences). Exact decoding (verify): a block is the pass's accepted drafts followed by the
pass's own token, which is underlined (`|` before it without colour).
"""

from __future__ import annotations

import html

from selfmtp.decoding.results import Chunk, GenerationResult, summarize

# (smallest chunk size, ANSI 256-colour background, HTML colour): one token per pass stays neutral.
SIZE_COLOURS = (
    (1, 238, "#e5e7eb"),
    (2, 24, "#bfdbfe"),
    (3, 29, "#bbf7d0"),
    (5, 136, "#fde68a"),
    (9, 124, "#fca5a5"),
)
SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def _colour(size: int) -> tuple[int, str]:
    chosen = SIZE_COLOURS[0]
    for entry in SIZE_COLOURS:
        if size >= entry[0]:
            chosen = entry
    return chosen[1], chosen[2]


def _stats_line(result: GenerationResult) -> str:
    return (
        f"{result.num_tokens} tokens in {result.forward_passes} passes = {result.acceleration:.2f} tokens/pass, "
        f"{result.tokens_per_second:.1f} tokens/s, stop: {result.stop_reason}"
    )


def _split_drafts(chunk: Chunk, tokenizer) -> tuple[str, str]:
    """(accepted drafts' text, own token's text) of a verify pass; ("", text) when nothing was drafted."""
    if not chunk.drafted or chunk.drafted >= len(chunk.token_ids) or tokenizer is None:
        return ("", chunk.text) if not chunk.drafted else (chunk.text, "")
    drafts = tokenizer.decode(chunk.token_ids[: chunk.drafted])
    return (drafts, chunk.text[len(drafts) :]) if chunk.text.startswith(drafts) else ("", chunk.text)


def render_terminal(result: GenerationResult, *, colour: bool = True, tokenizer=None) -> str:
    """The generation as coloured blocks, each followed by its size as a subscript.

    With `tokenizer`, a verify pass's own token (after its accepted drafts) is underlined."""
    parts = []
    for chunk in result.chunks:
        size = len(chunk.token_ids)
        drafts, own = (text.replace("\n", "↵\n") for text in _split_drafts(chunk, tokenizer))
        if colour:
            ansi, _ = _colour(size)
            marked = drafts + (f"\x1b[4m{own}\x1b[24m" if drafts and own else own)
            lines = marked.split("\n")  # colour each line separately so the background does not bleed
            block = "\n".join(f"\x1b[48;5;{ansi}m\x1b[97m{line}\x1b[0m" if line else "" for line in lines)
            parts.append(f"{block}\x1b[2m{str(size).translate(SUBSCRIPT)}\x1b[0m")
        else:
            parts.append(f"[{drafts}|{own}]{str(size).translate(SUBSCRIPT)}" if drafts else f"[{own}]{str(size).translate(SUBSCRIPT)}")
    return "".join(parts) + "\n" + _stats_line(result)


def render_html(
    results: list[GenerationResult], prompts: list[str] | None = None, title: str = "selfmtp chunks", tokenizer=None
) -> str:
    """A standalone HTML page: one section per generation, one coloured span per forward pass.

    With `tokenizer`, a verify pass's own token (after its accepted drafts) is underlined."""
    sections = []
    for i, result in enumerate(results):
        spans = []
        for chunk in result.chunks:
            size = len(chunk.token_ids)
            _, css = _colour(size)
            confidences = " ".join(f"{c:.2f}" for c in chunk.confidences)
            drafts, own = _split_drafts(chunk, tokenizer)
            body = html.escape(drafts) + (f"<u>{html.escape(own)}</u>" if drafts and own else html.escape(own))
            drafted = f", {chunk.drafted} accepted drafts" if chunk.drafted else ""
            spans.append(
                f'<span class="chunk" style="background:{css}" title="{size} tokens{drafted}, confidences {confidences}">'
                f"{body}<sub>{size}</sub></span>"
            )
        prompt = f"<pre class=prompt>{html.escape(prompts[i])}</pre>" if prompts and i < len(prompts) else ""
        sections.append(
            f"<section><h2>Generation {i + 1}</h2>{prompt}<div class=output>{''.join(spans)}</div>"
            f"<p class=stats>{html.escape(_stats_line(result))} ({html.escape(result.strategy)})</p></section>"
        )
    summary = summarize(results)
    legend = "".join(
        f'<span class="chunk" style="background:{css}">size &ge; {low}</span> '
        for low, _, css in SIZE_COLOURS
    )
    overall = (
        f"{summary['generations']} generations, {summary['tokens_per_pass_pooled']:.2f} tokens/pass pooled "
        f"({summary['acceleration_mean']:.2f} &plusmn; {summary['acceleration_std']:.2f} per-generation mean), "
        f"{summary['total_tokens']} tokens in {summary['total_forward_passes']} passes."
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #111; }}
.output {{ white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.9; }}
.chunk {{ border-radius: 3px; padding: 1px 0; margin-right: 1px; }}
.chunk sub {{ color: #555; font-size: 0.65em; }}
.prompt {{ white-space: pre-wrap; color: #555; background: #f9fafb; padding: 0.5rem; }}
.stats {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>One coloured block per forward pass; the subscript is the number of tokens it produced. Exact decoding:
accepted drafts, then the pass's own token underlined. {legend}</p>
<p class=stats>{overall}</p>
{"".join(sections)}
</body></html>
"""
