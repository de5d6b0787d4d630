"""Imports point one way: every module's imports, read with ast, against
the direction table in HACKING.rst; and no import cycle anywhere."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("nbdplug", "tapbridge", "dm", "hotplug")
# Only hotplug may use these (nbdkit's Python must never meet them).
HOTPLUG_ONLY = ("pyudev", "parted", "_ped")


def modules():
    """{module name: path} for every module of the four packages."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def layer_of(name):
    parts = name.split(".")
    if parts[0] != "nbdplug":
        return parts[0]
    if len(parts) == 1:
        return "api"
    if parts[1] in ("formats", "ops", "serve", "opener", "cli"):
        return parts[1]
    return "base"


def allowed():
    """The table in HACKING.rst: layer → the layers it may import."""
    text = (ROOT / "HACKING.rst").read_text()
    block = text.split(".. layers (read by tests/test_layers.py)", 1)[1]
    # A simple table: border, heading, border, rows, border.
    lines = [line for line in block.splitlines() if line.strip()]
    borders = [i for i, line in enumerate(lines) if line.startswith("=")]
    rows = {}
    for line in lines[borders[1] + 1:borders[2]]:
        layer, may = line.split(None, 1)
        rows[layer] = {m.strip() for m in may.split(",")}
    return rows


def imports(name, path, known):
    """(line, imported module) for each import in the module, resolving
    relative imports and `from package import module`."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else \
        name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module
                                          else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if sub in known else target


def graph():
    known = modules()
    return known, {name: list(imports(name, path, known))
                   for name, path in known.items()}


def test_the_table_names_every_layer():
    table = allowed()
    layers = {layer_of(name) for name in modules()}
    assert layers <= set(table), layers - set(table)
    for may in table.values():
        assert may <= set(table), may - set(table)


def test_imports_follow_the_table():
    table = allowed()
    known, edges = graph()
    wrong = []
    for name, targets in edges.items():
        mine = layer_of(name)
        for line, target in targets:
            top = target.split(".")[0]
            if top in HOTPLUG_ONLY and mine != "hotplug":
                wrong.append(f"{known[name]}:{line} imports {target}")
            if top not in PACKAGES:
                continue
            theirs = layer_of(target)
            if theirs not in table[mine]:
                wrong.append(f"{known[name]}:{line}: {mine} imports "
                             f"{target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    known, edges = graph()
    deps = {name: {t for _, t in targets if t in known and t != name}
            for name, targets in edges.items()}
    # A package's __init__ importing its own submodules is how a package
    # gathers its names, not a dependency of theirs on it.
    for name in deps:
        deps[name] = {t for t in deps[name]
                      if not name.startswith(t + ".")}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(deps[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(deps):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_formats_never_reach_up():
    """Spelled out, as the issue of the layout asked: a format never
    imports the opener, the operations, the servers or the CLI."""
    _, edges = graph()
    for name, targets in edges.items():
        if layer_of(name) == "formats":
            for _, target in targets:
                assert not re.match(r"nbdplug\.(opener|ops|serve|cli)\b",
                                    target), (name, target)
