"""docs/configuration.md cannot drift: its tables are compared row by row with what the code says.

The connector table comes from ``ConnectorConfig`` (fields, defaults, and the attribute docstrings
in config.py), the router tables from ``RouterConfig`` and the proxy's argparse, the planner table
from ``plan``'s argparse. Regenerate a table with ``python tests/unit/test_docs_configuration.py``.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
from pathlib import Path

import msgspec

from vllm_hetero_pd import config as connector_config
from vllm_hetero_pd.planner import cli as planner_cli
from vllm_hetero_pd.router import cli as router_cli
from vllm_hetero_pd.router.config import InstanceConfig, PoolConfig, RatioConfig, RouterConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def attribute_docstrings(cls: type) -> dict[str, str]:
    """The string literal right under each annotated attribute of ``cls`` (how config.py documents fields)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def connector_rows() -> list[str]:
    cls = connector_config.ConnectorConfig
    docs, defaults = attribute_docstrings(cls), cls()
    hints = {f.name: f.type for f in msgspec.structs.fields(cls)}
    return [f"| `{name}` | `{_type_name(hints[name])}` | `{json.dumps(getattr(defaults, name))}` | {cell(docs[name])} |"
            for name in cls.__struct_fields__]


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if not getattr(tp, "__args__", None) else str(tp).replace("typing.", "")


def router_key_rows() -> list[str]:
    """Every key of router.yaml (dotted for nested sections), its default and the flag that sets it."""
    flags = {**{k: k for k in router_cli._TOP_LEVEL}, **{f"health.{v}": k for k, v in router_cli._HEALTH.items()},
             **{f"timeouts.{v}": k for k, v in router_cli._TIMEOUTS.items()},
             **{v: k for k, v in router_cli._SECRETS.items()}, "host": "host", "port": "port",
             "prefill.instances": "prefill", "decode.instances": "decode",
             "prefill.policy": "prefill_policy", "decode.policy": "decode_policy", "mixed": "mixed",
             "ratio.model": "ratio_model", "ratio.catalog": "ratio_catalog",
             **{f"ratio.{v}": k for k, v in router_cli._RATIO.items()}}
    parser = argparse.ArgumentParser()
    router_cli.add_arguments(parser)
    option = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    # the ratio section is off (null) by default; its keys are listed with model shown as "required"
    defaults = RouterConfig(decode=PoolConfig(instances=(InstanceConfig(url="http://decode:8000", device="CPU"),)),
                            ratio=RatioConfig(model="required"))
    rows = []
    for key, default in _flatten(defaults):
        shown = "[]" if key.endswith(".instances") or key == "mixed" else json.dumps(default)
        flag = f"`{option[flags[key]]}`" if key in flags else "—"
        rows.append(f"| `{key}` | `{shown}` | {flag} |")
    return rows


def _flatten(struct, prefix: str = ""):
    for name in struct.__struct_fields__:
        value = getattr(struct, name)
        if isinstance(value, msgspec.Struct):
            yield from _flatten(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", msgspec.to_builtins(value)


def flag_rows(add_arguments) -> list[str]:
    """One row per flag: its argparse default (— for none; router defaults live in router-keys) and help."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rows = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        default = ("required" if action.required else "—" if action.default in (None, [])
                   else f"`{action.default}`")
        choices = f"one of {', '.join(map(str, action.choices))}" if action.choices else "—"
        meaning = " ".join((action.help or "").split()) or choices
        rows.append(f"| `{', '.join(action.option_strings)}` | {default} | {cell(meaning)} |")
    return rows


TABLES = {
    "connector": connector_rows,
    "router-keys": router_key_rows,
    "router-flags": lambda: flag_rows(router_cli.add_arguments),
    "planner-flags": lambda: flag_rows(planner_cli.add_arguments),
}


def documented(name: str) -> list[str]:
    text = DOC.read_text()
    match = re.search(rf"<!-- table:{name} -->\n(.*?)<!-- /table -->", text, re.S)
    assert match, f"docs/configuration.md has no <!-- table:{name} --> block"
    return [line for line in match.group(1).splitlines() if line.startswith("| ") and not line.startswith("| ---")
            and not line.startswith("| key") and not line.startswith("| flag")]


def test_connector_table_matches_connector_config():
    assert documented("connector") == connector_rows()
    assert len(connector_rows()) == len(connector_config.ConnectorConfig.__struct_fields__)


def test_router_key_table_matches_router_config():
    assert documented("router-keys") == router_key_rows()


def test_router_flag_table_matches_the_proxy_argparse():
    assert documented("router-flags") == TABLES["router-flags"]()


def test_planner_flag_table_matches_the_plan_argparse():
    assert documented("planner-flags") == TABLES["planner-flags"]()


if __name__ == "__main__":
    print("\n".join(TABLES[sys.argv[1]]()))
