"""Slurm's compact host lists (``node[01-03,07],gpu5``) expanded to host names.

``scontrol show hostnames`` is the reference and is used where it exists (a Slurm node); a container or login node
without Slurm's tools gets :func:`expand_hostlist`, a parser of the documented syntax (``man scontrol``, "HOSTLIST
EXPRESSIONS"): comma-separated names, each with bracketed lists of numbers and ``lo-hi`` ranges, zero-padded to the
width of ``lo`` (``[08-10]`` -> 08, 09, 10). Several brackets in one name expand as their product
(``rack[1-2]n[1-2]`` -> rack1n1, rack1n2, rack2n1, rack2n2)."""
from __future__ import annotations

import shutil
import subprocess


def expand_hostlist(text: str, what: str = "host list") -> list[str]:
    """The host names of a compact list, in order. ``what`` names the list (its variable) in errors."""
    hosts: list[str] = []
    for item in _split_top(text.strip(), what):
        hosts += _expand(item, text, what)
    if not hosts:
        raise ValueError(f"{what} is empty")
    return hosts


def _split_top(text: str, what: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "[") - (c == "]")
        if depth not in (0, 1):
            raise ValueError(f"{what} '{text}' has unbalanced or nested brackets")
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"{what} '{text}' has an unclosed '['")
    items.append(text[start:])
    if any(not s for s in items):
        raise ValueError(f"{what} '{text}' has an empty name")
    return items


def _expand(item: str, text: str, what: str) -> list[str]:
    if "[" not in item:
        if "]" in item:
            raise ValueError(f"{what} '{text}' has a ']' without '['")
        return [item]
    head, rest = item.split("[", 1)
    body, tail = rest.split("]", 1)
    numbers: list[str] = []
    for part in body.split(","):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"{what} '{text}': '[{body}]' must hold numbers and lo-hi ranges")
        if dash and int(hi) < int(lo):
            raise ValueError(f"{what} '{text}': range {part} runs backwards")
        numbers += [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1)] if dash else [lo]
    return [head + n + t for n in numbers for t in _expand(tail, text, what)]


def hostnames(text: str, what: str = "host list") -> list[str]:
    """The host names of a compact list: ``scontrol show hostnames`` where Slurm's tools are installed (the
    reference for any syntax this parser lacks), else :func:`expand_hostlist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        p = subprocess.run([scontrol, "show", "hostnames", text], capture_output=True, text=True, timeout=60)
        if p.returncode == 0 and p.stdout.split():
            return p.stdout.split()
    return expand_hostlist(text, what)
