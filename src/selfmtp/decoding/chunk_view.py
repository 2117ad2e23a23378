"""Show which tokens came out of the same forward pass (the paper's Figure 1).

Each pass's accepted tokens form one coloured block annotated with its size; the colour grows
warmer with the size, so long confident spans stand out from token-by-token stretches.
`render_terminal` uses ANSI colours; `render_html` writes a standalone page (hover a block for
its confidences).
"""

from __future__ import annotations

import html

from selfmtp.decoding.loop import GenerationResult, summarize

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


def render_terminal(result: GenerationResult, *, colour: bool = True) -> str:
    """The generation as coloured blocks, each followed by its size as a subscript."""
    parts = []
    for chunk in result.chunks:
        size = len(chunk.token_ids)
        text = chunk.text.replace("\n", "↵\n")
        if colour:
            ansi, _ = _colour(size)
            lines = text.split("\n")  # colour each line separately so the background does not bleed
            block = "\n".join(f"\x1b[48;5;{ansi}m\x1b[97m{line}\x1b[0m" if line else "" for line in lines)
            parts.append(f"{block}\x1b[2m{str(size).translate(SUBSCRIPT)}\x1b[0m")
        else:
            parts.append(f"[{text}]{str(size).translate(SUBSCRIPT)}")
    return "".join(parts) + "\n" + _stats_line(result)


def render_html(
    results: list[GenerationResult], prompts: list[str] | None = None, title: str = "selfmtp chunks"
) -> str:
    """A standalone HTML page: one section per generation, one coloured span per forward pass."""
    sections = []
    for i, result in enumerate(results):
        spans = []
        for chunk in result.chunks:
            size = len(chunk.token_ids)
            _, css = _colour(size)
            confidences = " ".join(f"{c:.2f}" for c in chunk.confidences)
            spans.append(
                f'<span class="chunk" style="background:{css}" title="{size} tokens, confidences {confidences}">'
                f"{html.escape(chunk.text)}<sub>{size}</sub></span>"
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
        f"{summary['generations']} generations, acceleration {summary['acceleration_mean']:.2f} &plusmn; "
        f"{summary['acceleration_std']:.2f} tokens/pass, {summary['total_tokens']} tokens in "
        f"{summary['total_forward_passes']} passes."
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
<p>One coloured block per forward pass; the subscript is the number of tokens it produced. {legend}</p>
<p class=stats>{overall}</p>
{"".join(sections)}
</body></html>
"""
