"""Fuzzing: schemathesis against /openapi.json of a running server, and hypothesis
properties of the password and username rules. Run by `.ci/run` with `--with fuzz`.

Every operation is called with generated valid and invalid input, logged in through an
auth hook (a fresh session per call, since the fuzzer logs out and deletes sessions), and
checked for: no server error, a status the document lists, a body matching its schema.
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from helpers import PASSWORD, TEST_DATABASE_URL, base_settings, live_server, post_json
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from authapp import create_app
from authapp.auth import passwords
from authapp.extensions import db

MAX_EXAMPLES = 60
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
FUZZ_USER = {"email": "fuzzer@example.com", "username": "fuzzer", "password": PASSWORD}


@pytest.fixture(scope="module")
def fuzz_database_url(request, tmp_path_factory, database_factory):
    """PostgreSQL when the suite has it (it refuses more than SQLite: NUL, lengths), else SQLite."""
    backend = "postgresql" if TEST_DATABASE_URL else "sqlite"
    with database_factory(backend, request, tmp_path_factory.mktemp("fuzz")) as url:
        yield url


@pytest.fixture(scope="module")
def fuzz_server(fuzz_database_url):
    app = create_app(base_settings(DATABASE_URL=fuzz_database_url, LOGIN_MAX_FAILURES="10000"))
    with live_server(app) as base:
        assert post_json(f"{base}/auth/register", FUZZ_USER)[0] == 201
        yield base
    with app.app_context():
        db.engine.dispose()


def _operations() -> list[tuple[str, str, bool]]:
    """Every (method, path, takes input) of the document, read from an app made in-process."""
    spec = create_app(base_settings(DATABASE_URL="sqlite://")).test_client().get("/openapi.json").get_json()
    verbs = {"get", "post", "put", "patch", "delete"}
    return [
        (method.upper(), path, bool(op.get("requestBody") or op.get("security") or item.get("parameters")))
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in verbs
    ]


OPERATIONS = _operations()
# Invalid input can be generated only where there is input: a body, a path parameter, a token.
CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for method, path, takes_input in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if takes_input or mode is GenerationMode.POSITIVE
]


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")


def test_every_operation_is_fuzzed():
    assert len(OPERATIONS) == 23, OPERATIONS


@pytest.mark.fuzz
@pytest.mark.parametrize("method,path,mode", CASES)
def test_api_conforms_to_its_document(api_schema, fuzz_server, method, path, mode):
    operation = api_schema[path][method]

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case):
        # A fresh session for every call: the fuzzer logs out and deletes sessions.
        _, login = post_json(f"{fuzz_server}/auth/login", {"username": "fuzzer", "password": PASSWORD})
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {login['access_token']}"}
        response = case.call_and_validate(base_url=fuzz_server, checks=CHECKS)
        if response.status_code >= 400:
            body = response.json()
            assert {"detail", "error_code", "timestamp", "request_id"} <= set(body)
            headers = {name.lower(): value for name, value in response.headers.items()}
            request_id = headers["x-request-id"]
            assert body["request_id"] == (request_id[0] if isinstance(request_id, list) else request_id)

    call()


# -- Properties of the field rules --------------------------------------------------------

unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=128)


@pytest.mark.fuzz
@settings(max_examples=200, deadline=None)
@given(password=unicode_text)
def test_any_password_hashes_and_verifies_without_truncation(password):
    hashed = passwords.hash_password(password, 4)
    assert hashed.startswith("$2b$04$")
    assert passwords.verify_password(password, hashed)
    assert not passwords.verify_password(password + "x", hashed)
    assert not passwords.verify_password("x" + password, hashed)


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None)
@given(password=st.text(st.characters(blacklist_categories=("Cs",)), max_size=300))
def test_policy_length_is_counted_in_code_points_after_nfkc(password):
    problems = passwords.policy_problems(password, min_length=8, username=None, email=None)
    length = len(passwords.normalize(password))
    if length < 8:
        assert problems == ["Password must be at least 8 characters long."]
    elif length > 128:
        assert problems == ["Password must be at most 128 characters long."]
    else:
        assert all("characters long" not in p for p in problems)


@pytest.mark.fuzz
@settings(max_examples=200, deadline=None)
@given(
    prefix=st.text(max_size=10),
    suffix=st.text(max_size=10),
    username=st.from_regex(r"[A-Za-z0-9_.-]{3,20}", fullmatch=True),
)
def test_a_password_containing_the_username_is_refused(prefix, suffix, username):
    password = prefix + username.swapcase() + suffix + "-padding-9"
    problems = passwords.policy_problems(password, min_length=8, username=username, email=None)
    if len(passwords.normalize(password)) <= 128 and username.casefold() in passwords.normalize(password).casefold():
        assert "Password must not contain the username." in problems


@pytest.fixture(scope="module")
def schema_app(fuzz_database_url):
    app = create_app(base_settings(DATABASE_URL=fuzz_database_url, LOGIN_MAX_FAILURES="10000"))
    yield app
    with app.app_context():
        db.engine.dispose()


# Any code point, JSON can carry them all; lone surrogates, NUL and line breaks are drawn
# often on purpose (uniformly they would almost never come up).
any_character = st.one_of(
    st.characters(codec=None, exclude_categories=()),
    st.characters(categories=["Cs"]),
    st.sampled_from("\x00\n\r\t\u0130\ufb03"),
)


def any_text(min_size: int = 0, max_size: int = 60) -> st.SearchStrategy[str]:
    """Strings of `any_character` (st.text() itself leaves lone surrogates out)."""
    return st.lists(any_character, min_size=min_size, max_size=max_size).map("".join)


near_usernames = st.text(st.sampled_from("abcXYZ019_.-\n\r\t \x00éİ"), max_size=60)


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(username=st.one_of(near_usernames, any_text(max_size=60)))
@example(username="abc\n")
@example(username="x" * 50 + "\n")
def test_username_rule(schema_app, username):
    from marshmallow import ValidationError

    from authapp.schemas import USERNAME_RE, Username

    valid = USERNAME_RE.fullmatch(username) is not None
    with schema_app.app_context():
        try:
            Username().deserialize(username)
            accepted = True
        except ValidationError:
            accepted = False
    assert accepted == valid
    assert accepted == (3 <= len(username) <= 50 and all(c.isascii() and (c.isalnum() or c in "_.-") for c in username))


_unique = itertools.count()
json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    any_text(max_size=200),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@pytest.mark.fuzz
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["email", "username", "password", "unknown"]),
    # Strings long enough to pass the length rules, most of the time; anything else otherwise.
    value=st.sampled_from(["long", "long", "short", "other"]).flatmap(
        lambda kind: {
            "long": any_text(min_size=8, max_size=130),
            "short": any_text(max_size=12),
            "other": json_values,
        }[kind]
    ),
)
def test_register_never_answers_500(schema_app, field, value):
    """A valid registration with one field replaced by anything JSON can carry."""
    suffix = next(_unique)  # a new account each time, so that every valid body is hashed and stored
    body = {"email": f"f{suffix}@example.com", "username": f"fuzz{suffix}", "password": "violet-harbor-cactus-42"}
    body[field] = value
    response = schema_app.test_client().post("/auth/register", json=body)
    assert response.status_code in (201, 400, 409), response.get_json()


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["email", "username"]), value=any_text(max_size=60), password=any_text(max_size=40))
def test_login_never_answers_500(schema_app, field, value, password):
    """Whatever names the account and whatever the password: 400, 401 or 429, never 500."""
    response = schema_app.test_client().post("/auth/login", json={field: value, "password": password})
    assert response.status_code in (400, 401, 429), response.get_json()
