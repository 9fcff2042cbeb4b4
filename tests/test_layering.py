"""The layering rules of docs/architecture.md, read from the code itself.

Only views, request hooks and extension set-up may read the request or Flask's config;
flows and services get what they need as arguments (the auth context, the client) or from
`authapp.settings`. `g` holds only the request id and the auth context. The wall clock is
read through `authapp.clock` only, so a test that moves `clock.now` moves the service.
And every import between authapp's modules runs to the importer's own layer or below, as
the page's layer table lists them, and is the one its import table names.
"""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flask import g
from helpers import PASSWORD, base_settings, bearer

PACKAGE = Path(__file__).resolve().parent.parent / "authapp"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"

# Views (the HTTP and CLI entry points), request hooks, and extension set-up.
MAY_READ_THE_REQUEST = {
    "addresses.py",  # Flask-Limiter's key function
    "auth/routes.py",
    "auth/jwks.py",
    "health.py",
    "openapi.py",
    "errors.py",
    "security.py",
    "observability/requests.py",
    "observability/logs.py",
    "observability/metrics.py",
}
MAY_READ_FLASK_CONFIG = {
    "__init__.py",
    "cli.py",
    "database.py",
    "errors.py",
    "extensions.py",
    "openapi.py",
    "ratelimit.py",
    "settings.py",
}


def offences(source: str) -> tuple[list[int], list[int]]:
    """Lines that read `flask.request`, and lines that read `current_app.config`."""
    tree = ast.parse(source)
    request_lines, config_lines = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "flask":
            if any(alias.name == "request" for alias in node.names):
                request_lines.append(node.lineno)
        elif isinstance(node, ast.Attribute):
            value = node.value
            if node.attr == "request" and isinstance(value, ast.Name) and value.id == "flask":
                request_lines.append(node.lineno)
            if node.attr == "config" and isinstance(value, ast.Name) and value.id == "current_app":
                config_lines.append(node.lineno)
    return request_lines, config_lines


def test_the_scan_finds_what_it_looks_for():
    source = "import flask\nfrom flask import current_app, request\nx = current_app.config['A']\ny = flask.request\n"
    assert offences(source) == ([2, 4], [3])
    assert offences("from flask import g\nx = app.config\n") == ([], [])


def test_only_views_hooks_and_setup_read_the_request_or_the_config():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        request_lines, config_lines = offences(path.read_text())
        if request_lines and name not in MAY_READ_THE_REQUEST:
            found.append(f"{name}:{request_lines[0]} reads flask.request")
        if config_lines and name not in MAY_READ_FLASK_CONFIG:
            found.append(f"{name}:{config_lines[0]} reads current_app.config")
    assert found == []


def test_g_holds_the_request_id_the_start_time_and_the_auth_context(app, client):
    """The request id is `g.request_id`, read from the environ (observability.requests);
    the start time lives in the request observer; so only the auth context is set on `g`."""
    seen = []

    @app.after_request
    def look(response):
        # Names of our own (the libraries' start with an underscore).
        seen.append(({name for name in vars(g) if not name.startswith("_")}, g.request_id))
        return response

    account = {"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    answers = [client.post("/auth/register", json=account)]
    answers.append(client.get("/auth/me", headers=bearer(answers[0].get_json()["access_token"])))
    answers.append(client.post("/auth/login", json={"email": "alice@example.com", "password": "wrong password here"}))
    assert [names for names, _ in seen] == [set(), {"auth"}, set()]
    assert [request_id for _, request_id in seen] == [answer.headers["X-Request-ID"] for answer in answers]


# -- One clock ----------------------------------------------------------------------------

# The wall clock read outside authapp/clock.py, by (module, function), each with the reason
# it is not clock.now(). Durations and timeouts use time.monotonic(), which is not looked for.
REAL_CLOCK_READS = {
    ("auth/keys.py", "KeyRing.still_verifies"): "stands in for PyJWT's exp check, which reads the real time",
    ("observability/logs.py", "RequestLineRecord.__init__"): "a log record's time, taken as logging takes it",
    ("observability/logs.py", "log_request_line"): "the same, for a line written without a record",
    ("ratelimit.py", "_retry_after"): "Flask-Limiter's reset time is on its storage's clock, the real one",
    ("ratelimit.py", "_handle_rate_limited"): "the same",
}
WALL_CLOCK = {("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today"), ("date", "today")}
WALL_CLOCK |= {("time", "time"), ("time", "time_ns"), ("time", "gmtime"), ("time", "localtime"), ("time", "strftime")}


def clock_reads(source: str) -> list[tuple[int, str, str]]:
    """(line, enclosing function, what) for each read of the wall clock that a moved
    `clock.now` would not move: `datetime.now()`, `time.time()` and their kin, and
    `clock.now` taken as a value (a column default bound at import keeps the real one)."""
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, scope: str, called: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            scope = f"{scope}.{node.name}" if scope else node.name
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (node.module, alias.name) in {("time", "time"), ("time", "time_ns")}:
                    found.append((node.lineno, scope, f"from time import {alias.name}"))
                if (node.module or "").endswith("clock") and alias.name == "now":
                    found.append((node.lineno, scope, "from clock import now"))
        if isinstance(node, ast.Attribute):
            value = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
            if (value, node.attr) in WALL_CLOCK:
                found.append((node.lineno, scope, f"{value}.{node.attr}"))
            if (value, node.attr) == ("clock", "now") and not called:
                found.append((node.lineno, scope, "clock.now taken as a value"))
        for child in ast.iter_child_nodes(node):
            visit(child, scope, isinstance(node, ast.Call) and child is node.func)

    visit(ast.parse(source), "", False)
    return found


def test_the_clock_scan_finds_what_it_looks_for():
    source = (
        "import datetime, time\n"
        "from datetime import date, datetime\n"
        "from time import time_ns\n"
        "class A:\n"
        "    def f(self):\n"
        "        return datetime.now(UTC), datetime.datetime.utcnow(), date.today()\n"
        "def g():\n"
        "    return time.time(), time.monotonic(), clock.now(), clock.iso_now()\n"
        "column = Column(default=clock.now)\n"
    )
    assert clock_reads(source) == [
        (3, "", "from time import time_ns"),
        (6, "A.f", "datetime.now"),
        (6, "A.f", "datetime.utcnow"),
        (6, "A.f", "date.today"),
        (8, "g", "time.time"),
        (9, "", "clock.now taken as a value"),
    ]


def test_the_wall_clock_is_read_through_authapp_clock_only():
    found, allowed = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name == "clock.py":
            continue
        for line, scope, what in clock_reads(path.read_text()):
            if (name, scope) in REAL_CLOCK_READS:
                allowed.add((name, scope))
            else:
                found.append(f"{name}:{line} ({scope or 'module'}): {what}; call clock.now()")
    assert found == []
    assert allowed == set(REAL_CLOCK_READS)  # no reason kept for a read that is gone


def test_moving_clock_now_moves_the_error_envelope_and_a_signing_keys_age(database_url, later):
    """The envelope's timestamp and `keys retire`'s "its tokens may still be valid" both
    follow `clock.now`, as the tests that move it expect."""
    from authapp import create_app
    from authapp.auth import keys

    app = create_app(base_settings(DATABASE_URL=database_url, JWT_ALGORITHM="EdDSA"))
    with app.app_context():
        first = keys.generate(activate=True)
        keys.generate(activate=True)  # the first stops signing now: its tokens live on a while
    refused = app.test_cli_runner().invoke(args=["keys", "retire", first.kid])
    assert refused.exit_code == 1 and "valid until" in refused.output
    moved = timedelta(days=1000)
    later(int(moved.total_seconds()))
    stamp = datetime.fromisoformat(app.test_client().get("/no/such/path").get_json()["timestamp"])
    assert abs(stamp - (datetime.now(UTC) + moved)) < timedelta(minutes=1)
    retired = app.test_cli_runner().invoke(args=["keys", "retire", first.kid])
    assert retired.exit_code == 0, retired.output


# -- The layers ---------------------------------------------------------------------------


def module_of(parts: list[str]) -> str | None:
    """The file under authapp/ of a dotted name's parts below `authapp` (None: not ours)."""
    path = PACKAGE.joinpath(*parts)
    if path.with_suffix(".py").is_file() and parts:
        return "/".join(parts) + ".py"
    if (path / "__init__.py").is_file():
        return "/".join([*parts, "__init__.py"])
    return None


def imports_of(name: str, source: str) -> set[str]:
    """The modules of authapp (as files under authapp/) that module `name` imports,
    wherever the import stands: a function's own import, or one for type checking only,
    is an arrow too."""
    package = name.split("/")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name.split(".")[1:] for alias in node.names if alias.name.split(".")[0] == "authapp"]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            targets = [base + [alias.name] if module_of(base + [alias.name]) else base for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "authapp":
            base = node.module.split(".")[1:]  # type: ignore[union-attr]
            targets = [base + [alias.name] if module_of(base + [alias.name]) else base for alias in node.names]
        else:
            continue
        found |= {module for module in map(module_of, targets) if module is not None and module != name}
    return found


def the_imports() -> dict[str, set[str]]:
    """Each module of authapp (a file under authapp/) and the modules of authapp it imports."""
    names = {path.relative_to(PACKAGE).as_posix(): path for path in sorted(PACKAGE.rglob("*.py"))}
    return {name: imports_of(name, path.read_text()) for name, path in names.items()}


def tables_under(heading: str, text: str) -> list[list[list[str]]]:
    """The tables of section `heading` of a page, each its rows (below the header) of cells."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    tables: list[list[list[str]]] = []
    previous = ""
    for line in section.splitlines():
        if line.startswith("|") and not previous.startswith("|"):
            tables.append([])
        if line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line):
            tables[-1].append([cell.strip() for cell in line.strip().strip("|").split("|")])
        previous = line
    return [rows[1:] for rows in tables]  # without the header


def named_files(cell: str) -> list[str]:
    """The files and folders below authapp/ that a cell names, `like/this.py` or `this/`."""
    names = re.findall(r"`([\w/.]+(?:\.py|/))`", cell)
    return [name.removeprefix("authapp/") for name in names if not name.startswith(("config.py", "devtools/"))]


def whose(names: dict[str, Any], module: str) -> Any:
    """What `names` (file or folder -> value) says of `module`: its file's entry, else its
    nearest folder's."""
    if module in names:
        return names[module]
    parts = module.split("/")[:-1]
    while parts:
        if "/".join(parts) + "/" in names:
            return names["/".join(parts) + "/"]
        parts.pop()
    return None


def unplaced(module: str, imports: dict[str, set[str]]) -> bool:
    """Whether a module the page does not name is an error: all but an empty package's marker."""
    return bool(imports[module]) or not module.endswith("__init__.py")


def the_layers(text: str) -> dict[str, list[str]]:
    """The page's layers, top first: each name and the files and folders it holds."""
    return {name.strip("`*"): named_files(modules) for name, _, modules in tables_under("Layers", text)[0]}


def upward(layers: dict[str, list[str]], imports: dict[str, set[str]]) -> list[str]:
    """The imports that run up the `layers` (top first), and the modules of no layer."""
    rank = {name: depth for depth, names in enumerate(layers.values()) for name in names}
    found = []
    for module, targets in sorted(imports.items()):
        depth = whose(rank, module)
        if depth is None:
            if unplaced(module, imports):
                found.append(f"{module} is in no layer")
            continue
        for target in sorted(targets):
            below = whose(rank, target)
            if below is not None and below < depth:
                found.append(f"{module} imports {target}, a layer above it")
    return found


def named(name: str, layers: dict[str, list[str]], modules: set[str]) -> set[str]:
    """The modules an import table's name stands for: a layer's, a module's (`keys`,
    `mail/cli`), a folder's (`mail`); none when it names nothing, or several by accident."""
    if name in layers:
        return {module for module in modules if whose(dict.fromkeys(layers[name], name), module) == name}
    if name + ".py" in modules:
        return {name + ".py"}
    folder = {module for module in modules if module.startswith(name + "/")}
    ending = {module for module in modules if module.endswith("/" + name + ".py")}
    return folder or (ending if len(ending) == 1 else set())


def unlike_the_code(rows: list[list[str]], layers: dict[str, list[str]], imports: dict[str, set[str]]) -> list[str]:
    """Where the module table (rows of: modules, their job, what they import) and the
    imports differ: an import its row does not name, a name its row's modules do not
    import, a module in no row."""
    row_of = {file: index for index, cells in enumerate(rows) for file in named_files(cells[0])}
    modules = set(imports).union(*imports.values())
    found = [
        f"{module} has no row"
        for module in sorted(imports)
        if whose(row_of, module) is None and unplaced(module, imports)
    ]
    for index, cells in enumerate(rows):
        own = {module for module in imports if whose(row_of, module) == index}
        if not own:
            continue
        used = set().union(*(imports[module] for module in own)) - own
        names = [] if cells[-1] == "nothing" else [name.strip(" `") for name in cells[-1].split(",")]
        meant: set[str] = set()
        for name in names:
            these = named(name, layers, modules) - own
            if not these & used:
                found.append(f"{cells[0]}: names {name}, which it does not import")
            meant |= these
        found += [f"{cells[0]}: imports {target}, not named" for target in sorted(used - meant)]
    return found


def test_the_layer_checks_find_what_they_look_for():
    source = "from .. import audit, clock\nfrom ..database import unit_of_work\nimport json\nimport authapp.errors\n"
    source += "def f():\n    from ..mail import outbox\n    from . import tokens\n"
    found = imports_of("auth/keys.py", source)
    assert found == {"audit.py", "clock.py", "database.py", "errors.py", "mail/outbox.py", "auth/tokens.py"}
    found = imports_of("__init__.py", "from .auth import keys\nfrom . import mail\n")
    assert found == {"auth/keys.py", "mail/__init__.py"}
    layers = {"top": ["cli.py"], "middle": ["mail/", "auth/keys.py"], "bottom": ["clock.py"]}
    imports = {"cli.py": {"mail/outbox.py"}, "mail/outbox.py": {"clock.py", "auth/keys.py"}, "clock.py": set()}
    assert upward(layers, imports) == []
    imports |= {"clock.py": {"mail/outbox.py"}, "auth/__init__.py": set(), "stray.py": set()}
    assert upward(layers, imports) == ["clock.py imports mail/outbox.py, a layer above it", "stray.py is in no layer"]
    rows = [["`cli.py`", "", "middle"], ["`mail/`", "", "clock, keys"], ["`clock.py`", "", "mail"]]
    assert unlike_the_code(rows, layers, imports) == ["stray.py has no row"]
    rows = [["`cli.py`", "", "outbox, clock"], ["`mail/`", "", "clock"], ["`clock.py`, `stray.py`", "", "nothing"]]
    assert unlike_the_code(rows, layers, imports) == [
        "`cli.py`: names clock, which it does not import",
        "`mail/`: imports auth/keys.py, not named",
        "`clock.py`, `stray.py`: imports mail/outbox.py, not named",
    ]


def test_every_import_runs_to_its_own_layer_or_below_as_the_page_lists_them():
    layers = the_layers(ARCHITECTURE.read_text())
    listed = [name for names in layers.values() for name in names]
    assert len(layers) >= 5 and all(layers.values())
    assert [name for name in listed if not (PACKAGE / name).exists() or listed.count(name) > 1] == []
    assert upward(layers, the_imports()) == []


def test_the_module_table_names_what_each_module_imports():
    """The last column of the page's module table, as the code has it."""
    text = ARCHITECTURE.read_text()
    rows = tables_under("Modules", text)[0]
    listed = [name for cells in rows for name in named_files(cells[0])]
    assert [name for name in listed if not (PACKAGE / name).exists() or listed.count(name) > 1] == []
    assert unlike_the_code(rows, the_layers(text), the_imports()) == []
