#!/usr/bin/env python3
"""Writes the key tables of docs/configuration.md from `mlx-serving config schema`.

Usage: python3 scripts/config-reference.py target/release/mlx-serving > /tmp/tables.md
The supervisor's tests check that every key of the schema is in docs/configuration.md.
"""
import json
import subprocess
import sys

schema = json.loads(subprocess.check_output([sys.argv[1], "config", "schema"]))
defs = schema["$defs"]


def resolve(node):
    if "$ref" in node:
        return defs[node["$ref"].split("/")[-1]]
    return node


def type_of(node):
    node = resolve(node)
    t = node.get("type")
    if isinstance(t, list):
        t = " or ".join(x for x in t if x != "null") + (" (optional)" if "null" in t else "")
    if t == "array":
        items = resolve(node.get("items", {}))
        inner = items.get("type", "table")
        return f"array of {inner}" if inner != "object" else "array of tables"
    return t or "table"


def default_of(node, parent_default, key):
    if "default" in node:
        d = node["default"]
    elif isinstance(parent_default, dict) and key in parent_default:
        d = parent_default[key]
    else:
        return ""
    return "`" + json.dumps(d) + "`"


def table(title, node, prefix, parent_default=None):
    node = resolve(node)
    props = node.get("properties", {})
    required = set(node.get("required", []))
    rows = []
    nested = []
    for key, sub in props.items():
        full = f"{prefix}{key}"
        r = resolve(sub)
        if r.get("properties") and type_of(sub) in ("table", "object"):
            nested.append((full, sub, sub.get("default")))
            continue
        if type_of(sub) == "array of tables":
            nested.append((full + "[]", r["items"], None))
        desc = (sub.get("description") or r.get("description") or "").replace("\n", " ")
        default = "required" if key in required else default_of(sub, parent_default, key)
        rows.append(f"| `{full}` | {type_of(sub)} | {default} | {desc} |")
    out = [f"### {title}", ""]
    if rows:
        out += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for full, sub, d in nested:
        out += table(f"`{full}`", sub, full + ".", d)
    return out


lines = table("Top level", schema, "")
print("\n".join(lines))
