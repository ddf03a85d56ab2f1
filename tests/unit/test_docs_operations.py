"""docs/operations.md lists every error message the code can emit.

Messages are found in the source by their shape, not by a hand-kept list: the string (or
f-string) argument of every ``raise SomeError(...)`` and of the router's ``error_response`` /
``_sse_error`` calls. For each, its longest literal stretch (the text between formatted values)
must appear in the troubleshooting section, so a new message without a row fails this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vllm_hetero_pd"
DOC = ROOT / "docs" / "operations.md"
RESPONSE_HELPERS = ("error_response", "_sse_error")


def template(node: ast.AST) -> list[str] | None:
    """The literal stretches of a str constant, f-string or ``+`` of them; None if not a string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = template(node.left), template(node.right)
        if left is None and right is None:
            return None
        return (left or []) + (right or [])
    return None


def messages() -> list[tuple[str, str]]:
    """(where, longest literal stretch) of every error message in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            parts = None
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                parts = next((t for t in map(template, node.exc.args) if t is not None), None)
            elif (isinstance(node, ast.Call) and len(node.args) > 1
                  and getattr(node.func, "id", getattr(node.func, "attr", None)) in RESPONSE_HELPERS):
                parts = template(node.args[1])
            if parts:
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", max(parts, key=len).strip()))
    return found


MESSAGES = messages()


def troubleshooting() -> str:
    """The troubleshooting section, with table-escaped pipes (``\\|``) read back as ``|``."""
    text = DOC.read_text()
    return text[text.index("## Troubleshooting"):].replace("\\|", "|")


def test_the_scan_finds_the_known_messages():
    """Guards the scanner itself: messages from raise, from error_response and from a concatenation."""
    fragments = {frag for _, frag in MESSAGES}
    assert "kv_connector_extra_config.heartbeat_s (" in fragments  # from implicitly joined f-strings
    assert "admin endpoints are disabled; start the router with an admin token" in fragments
    assert len(MESSAGES) > 150


@pytest.mark.parametrize("where,fragment", MESSAGES, ids=[w for w, _ in MESSAGES])
def test_message_has_a_troubleshooting_row(where, fragment):
    assert fragment in troubleshooting(), f"{where}: add a row for the message containing {fragment!r}"
