"""Why a channel group is not pruned, in the words a person would use.

The analysis records a precise reason where it stops (the node, the op, the
module); that is what a bug report needs, and ``ChannelReport.to_dict()``
keeps it. The table ``print(channel_report(prepared))`` shows says the same
thing short: "model input", "LayerNorm over channels (blocks.0.norm)",
"reshape/view (node 'view')", "opaque module encoder.rnn (LSTM)".
"""
from __future__ import annotations

import re

__all__ = ["plain_reason"]

_VIEWS = ("view", "reshape", "flatten", "unflatten", "split", "chunk", "unbind", "transpose", "permute",
          "narrow", "getitem", "expand", "unsqueeze", "squeeze", "contiguous")

# (pattern on the analysis' reason, plain words; \N are the pattern's groups). The first match wins.
_RULES: tuple[tuple[str, str], ...] = (
    (r"^model input", "model input"),
    (r"^model output", "model output"),
    (r"^input of module (\S+),", r"input of \1 (computed outside the traced graphs)"),
    (r"^output of module (\S+):", r"output of \1 (read outside the traced graphs)"),
    (r"^(?:LayerNorm|\w*Norm\w*) (\S+) normalizes over these channels", r"LayerNorm over channels (\1)"),
    (r"^nn\.MultiheadAttention (\S+): its attention weights", r"attention weights of \1 are read"),
    (r"^nn\.MultiheadAttention (\S+) reads key/value", r"cross-attention \1 (key/value share the query's columns)"),
    (r"^nn\.MultiheadAttention (\S+):", r"nn.MultiheadAttention \1"),
    (r"^attention (\S+) also reads its input outside", r"residual inside attention \1"),
    (r"^attention (\S+) returns more than its output projection", r"attention \1 returns a residual/LayerNorm"),
    (r"^attention (\S+) attends over a second tracked input", r"cross-attention \1"),
    (r"^leaf module (\S+) \((\w+)\) is opaque", r"opaque module \1 (\2)"),
    (r"^\w+ (\S+): cannot tell that it normalizes", r"normalization \1 (unknown dims)"),
    (r"reads the number of channels", "code reads the channel count"),
    (r"depthwise convolution with a channel multiplier", "depthwise conv with a channel multiplier"),
    (r"^weights not selected by pruner '([^']*)': (.*)", r"weights outside pruner \1: \2"),
    (r"pruned by several pruners \((.*)\)", r"pruned by several pruners (\1)"),
    (r"^a single channel", "a single channel"),
    (r"grouped convolution", "grouped convolution layout"),
    (r"^reaches the output of the traced graph", "model output"),
)
_NODE = re.compile(r"node '([^']*)' \((call_\w+|get_attr) ([^)]*)\)")


def plain_reason(reason: str) -> str:
    """A short plain-words form of one reason recorded by the channel analysis."""
    for pattern, words in _RULES:
        hit = re.search(pattern, reason)
        if hit:
            return hit.expand(words)
    node = _NODE.search(reason)
    if node:
        name, _, op = node.groups()
        if op in _VIEWS or op.rstrip("_") in _VIEWS:
            return f"reshape/view ({op} at node {name!r})"
        if "combined with a tensor whose channel layout is not tracked" in reason:
            return f"mixed with an untracked tensor ({op} at node {name!r})"
        return f"op not followed: {op} (node {name!r})"
    if reason.startswith("input channels of "):
        return "input from an op the analysis does not follow"
    return reason
