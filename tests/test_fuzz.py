"""Fuzzing: schemathesis against /openapi.json of a running server, and hypothesis
properties of the password and username rules. Run by `.ci/run` with `--with fuzz`.

Every operation is called with generated valid and invalid input, logged in through an
auth hook (a fresh session per call, since the fuzzer logs out and deletes sessions), and
checked for: no server error, a status the document lists, a body matching its schema.
"""

from __future__ import annotations

import pytest
import schemathesis
from helpers import PASSWORD, base_settings, live_server, post_json
from hypothesis import HealthCheck, given, settings
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
def fuzz_server(sqlite_template, tmp_path_factory):
    import shutil

    path = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    shutil.copyfile(sqlite_template, path)
    app = create_app(base_settings(DATABASE_URL=f"sqlite:///{path}", LOGIN_MAX_FAILURES="10000"))
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
    assert len(OPERATIONS) == 11, OPERATIONS


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
def schema_app(sqlite_template, tmp_path_factory):
    import shutil

    path = tmp_path_factory.mktemp("props") / "props.db"
    shutil.copyfile(sqlite_template, path)
    return create_app(base_settings(DATABASE_URL=f"sqlite:///{path}"))


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(username=st.text(max_size=60))
def test_username_rule(schema_app, username):
    from marshmallow import ValidationError

    from authapp.schemas import USERNAME_RE, Username

    valid = bool(USERNAME_RE.fullmatch(username)) and username.isascii()
    with schema_app.app_context():
        try:
            Username().deserialize(username)
            accepted = True
        except ValidationError:
            accepted = False
    assert accepted == valid
    assert accepted == (3 <= len(username) <= 50 and all(c.isascii() and (c.isalnum() or c in "_.-") for c in username))


@pytest.mark.fuzz
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.dictionaries(
        st.sampled_from(["email", "username", "password", "x"]),
        st.one_of(
            st.none(), st.booleans(), st.integers(), st.text(max_size=200), st.lists(st.text(max_size=5), max_size=3)
        ),
    )
)
def test_register_never_answers_500(schema_app, body):
    response = schema_app.test_client().post("/auth/register", json=body)
    assert response.status_code in (201, 400, 409), response.get_json()
