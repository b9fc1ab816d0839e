"""A1111's prompts that change with the step: prompt editing, alternation, and composable prompts (AND).

Written from A1111's documented rules (`modules/prompt_parser.py`: its grammar, its doctests, and how its
denoiser counts steps), not from its code:
- `[from:to:when]` is `from` until step `when`, then `to`; `[to:when]` is nothing, then `to`; `[from::when]` is
  `from`, then nothing. `when` written with a decimal point is a fraction of the steps (`0.5`, `1.5`), else a step
  number; either is cut to the steps and rounded down; below 1 it never switches back (so `to` throughout).
- `[a|b|c]` is `a` at step 1, `b` at step 2, ... (empty options allowed: `[fe|]male`).
- Brackets that are neither (`(word)`, `[word]`, `(word:1.2)`, stray ones) stay in the text, where the attention
  syntax (`syntax.py`) reads them. A prompt A1111's grammar cannot read at all (a `|` outside brackets, a lone
  backslash at its end) is its own text at every step.
- A schedule is a list of (last step, text); the text of denoising call `i` (0-based, as A1111's denoiser counts
  its calls) is the first entry whose last step is >= i.
- `AND` (a word of its own, upper case) splits a prompt into parts, each its own conditioning with its own
  schedule; a part ending in `:number` has that weight (1 otherwise); `(red:1.2` is the text `(red` at 1.2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

AND = re.compile(r"\bAND\b")
PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
NUMBER = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*\]")  # then the closing bracket
DEPTH = 64  # brackets inside brackets: deeper, the prompt is its own text (A1111's parser reads it as text too)
STOPS = "[]():|\\"


@dataclass(frozen=True)
class Group:
    """Brackets kept in the text: `(...)`, `(...:...)` or `[...]`."""

    open: str
    nodes: tuple
    close: str


@dataclass(frozen=True)
class Edit:
    """`[before:after:when]`; `before` None when the prompt gave none (`[after:when]`)."""

    before: tuple | None
    after: tuple
    when: str  # as written: a decimal point makes it a fraction of the steps


@dataclass(frozen=True)
class Alternate:
    options: tuple


class Unreadable(Exception):
    """A prompt A1111's grammar does not read: it is used as it is, at every step."""


def composable(prompt: str) -> list[tuple[str, float]]:
    """The prompt's parts (split at AND) and their weights."""
    parts = []
    for part in AND.split(prompt):
        text, weight = PART_WEIGHT.search(part).groups()
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


def schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """(last step, text) for the prompt over `steps` denoising calls."""
    try:
        nodes = parse(text)
    except Unreadable:
        return [(steps, text)]
    ends = {steps}
    for node in walk(nodes):
        if isinstance(node, Edit):
            when = switch_step(node.when, steps)
            if when >= 1:
                ends.add(when)
        elif isinstance(node, Alternate):
            ends.update(range(1, steps + 1))
    return [(end, render(nodes, end, steps)) for end in sorted(ends)]


def text_at(entries: list[tuple[int, str]], call: int) -> str:
    """The text of denoising call `call` (0-based)."""
    return next((text for end, text in entries if call <= end), entries[0][1])  # past the last: the first, as A1111


def switch_step(when: str, steps: int) -> int:
    value = float(when)
    if "." in when:
        value *= steps
    if not math.isfinite(value):  # 1e400: past every step (or, negative, before every one)
        return steps if value > 0 else -1
    return min(steps, int(value))


def render(nodes, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Group):
            out.append(node.open + render(node.nodes, step, steps) + node.close)
        elif isinstance(node, Edit):
            chosen = (node.before or ()) if step <= switch_step(node.when, steps) else node.after
            out.append(render(chosen, step, steps))
        else:
            out.append(render(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(out)


def walk(nodes):
    for node in nodes:
        yield node
        if isinstance(node, Group):
            yield from walk(node.nodes)
        elif isinstance(node, Edit):
            yield from walk((node.before or ()) + node.after)
        elif isinstance(node, Alternate):
            for option in node.options:
                yield from walk(option)


def parse(text: str) -> tuple:
    """The prompt as text, kept brackets, edits and alternations. Outside any construct a bracket or colon that
    starts none is text (as in A1111's grammar); a `|` there, or a lone backslash at the end, is unreadable."""
    nodes, i = [], 0
    while i < len(text):
        part, i = prompt(text, i)
        nodes += part
        if i < len(text):
            if text[i] not in "[]():":
                raise Unreadable(text)
            nodes.append(text[i])
            i += 1
    return tuple(nodes)


def prompt(text: str, i: int, depth: int = 0) -> tuple[list, int]:
    """Text, kept brackets, edits and alternations from `i`, up to the first character none of them can take."""
    if depth > DEPTH:
        raise Unreadable(text)
    nodes = []
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 == len(text) or text[i + 1] == "\n":  # A1111's escape takes any character but a line end
                raise Unreadable(text)
            nodes.append(text[i : i + 2])  # an escaped character, kept as written
            i += 2
        elif c in "([":
            found = construct(text, i, depth + 1)
            if found is None:
                break
            node, i = found
            nodes.append(node)
        elif c in STOPS:
            break
        else:
            j = i
            while j < len(text) and text[j] not in STOPS:
                j += 1
            nodes.append(text[i:j])
            i = j
    return nodes, i


def construct(text: str, i: int, depth: int):
    """The bracket construct at `i` and where it ends, or None where the brackets make none."""
    first, j = prompt(text, i + 1, depth)
    at = text[j] if j < len(text) else ""
    if text[i] == "(":
        if at == ")":
            return Group("(", tuple(first), ")"), j + 1
        if at == ":":
            second, k = prompt(text, j + 1, depth)
            if k < len(text) and text[k] == ")":
                return Group("(", tuple(first) + (":",) + tuple(second), ")"), k + 1
        return None
    if at == "]":
        return Group("[", tuple(first), "]"), j + 1
    if at == "|":
        options = [tuple(first)]
        while j < len(text) and text[j] == "|":
            option, j = prompt(text, j + 1, depth)
            options.append(tuple(option))
        if j < len(text) and text[j] == "]":
            return Alternate(tuple(options)), j + 1
        return None
    if at == ":":
        second, k = prompt(text, j + 1, depth)
        if k < len(text) and text[k] == ":":
            number = NUMBER.match(text, k + 1)
            if number:
                return Edit(tuple(first), tuple(second), number.group(1)), number.end()
        number = NUMBER.match(text, j + 1)
        if number:
            return Edit(None, tuple(first), number.group(1)), number.end()
    return None
