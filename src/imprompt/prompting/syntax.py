"""A1111 prompt text: `<lora:name:weight>` tags, attention weights `(word:1.3)` / `(word)` / `[word]`, and BREAK.

What the text means is A1111's behaviour, written here from its documented rules (and tested against the
examples in its documentation), because clients send A1111 prompts and expect A1111's pictures:
- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by 1.3;
  nesting multiplies; brackets left open close at the end; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters.
- `BREAK` (upper case, a word of its own) ends the current 75-token chunk.
- `<lora:NAME:WEIGHT>` (also `<lyco:...>`, the LyCORIS extension's spelling) is taken out of the text; WEIGHT
  defaults to 1. A1111's extra arguments (`<lora:name:te:unet>`, `dyn=`) are refused, not guessed.

Prompt editing, alternation and AND, which make a prompt change with the step or split it into several, are
`schedule.py`'s: this module reads one text of one step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RequestError, shown

ROUND, SQUARE = 1.1, 1 / 1.1
# Chunks a text may fill (2,400 tokens): each is one more text-encoder pass and 77 more tokens that every
# cross-attention layer reads at every step; 1,000 BREAKs held even the tiny test models for 41 s
MAX_CHUNKS = 32
BREAK = object()  # marks a chunk break in the parsed fragments

NETWORK_TAG = re.compile(r"<(lora|lyco|hypernet):([^>]*)>", re.IGNORECASE)
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
# escapes, brackets, `:weight)`, plain text, or a lone ':' / backslash
ATTENTION_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")


@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float


def take_lora_tags(prompt: str, field: str = "prompt") -> tuple[str, list[LoraTag]]:
    """The prompt without its `<lora:...>` tags, and the tags in order."""
    tags = []
    for match in NETWORK_TAG.finditer(prompt):
        kind, body = match.group(1).lower(), match.group(2)
        if kind == "hypernet":
            raise RequestError(
                f"{field}: {match.group(0)!r} names a hypernetwork; imprompt does not run hypernetworks "
                f"(remove the tag, or use a LoRA: <lora:name:weight>)"
            )
        parts = body.split(":")
        name = parts[0].strip()
        if not name or len(parts) > 2:
            raise RequestError(
                f"{field}: {match.group(0)!r} is not a LoRA tag imprompt reads; write <lora:NAME> or <lora:NAME:WEIGHT> "
                f"(separate text-encoder / UNet weights and dyn= are not supported)"
            )
        weight = 1.0
        if len(parts) == 2:
            try:
                weight = float(parts[1])
            except ValueError:
                raise RequestError(
                    f"{field}: the weight in {match.group(0)!r} is {parts[1]!r}, not a number; write e.g. <lora:{name}:0.8>"
                ) from None
        tags.append(LoraTag(name, weight))
    return NETWORK_TAG.sub("", prompt), tags


def parse_attention(text: str, field: str = "prompt") -> list:
    """The text as fragments `(text, weight)`, with `BREAK` between chunks; runs of equal weight merged. A weight
    that is no number (`(cat:.)`) is refused naming `field` (A1111 fails on it with a bare ValueError)."""
    fragments: list[list] = []  # [text, weight] or BREAK
    open_round: list[int] = []  # where each open bracket's fragments start
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment is not BREAK:
                fragment[1] *= factor

    for match in ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):  # an escaped character; a lone backslash is dropped, as in A1111
            fragments.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise RequestError(f"{field}: the weight in {shown(text[:match.end()][-40:])} is {weight!r}, not a "
                                   f"number; write e.g. (word:1.2), or escape the bracket as \\(") from None  # fmt: skip
            scale_from(open_round.pop(), factor)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        else:  # text (or a bracket with nothing to close, kept as text)
            for i, part in enumerate(BREAK_WORD.split(token)):
                if i:
                    fragments.append(BREAK)
                fragments.append([part, 1.0])
    for start in open_round:
        scale_from(start, ROUND)
    for start in open_square:
        scale_from(start, SQUARE)

    merged: list = []
    for fragment in fragments or [["", 1.0]]:
        if merged and fragment is not BREAK and merged[-1] is not BREAK and merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [f if f is BREAK else (f[0], f[1]) for f in merged]
