"""Login timing does not reveal whether an account exists (at the production bcrypt cost).

A benchmark-style check, run by `.ci/run` with `--with timing`: 50 logins for an unknown
user and 50 with a wrong password, interleaved; their medians must differ by < 20%.
"""

from __future__ import annotations

import statistics
import time

import pytest

ATTEMPTS = 50


@pytest.mark.timing
@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("settings", [{"BCRYPT_ROUNDS": "12", "LOGIN_MAX_FAILURES": "10000"}])
def test_unknown_user_costs_the_same_as_a_wrong_password(client, register, app):
    assert app.config["BCRYPT_ROUNDS"] == 12
    register(username="victim", email="victim@example.com")
    unknown, wrong = [], []
    for i in range(ATTEMPTS + 2):
        for bucket, body in (
            (unknown, {"username": f"ghost{i}", "password": "not-the-password-1"}),
            (wrong, {"username": "victim", "password": "not-the-password-1"}),
        ):
            started = time.perf_counter()
            response = client.post("/auth/login", json=body)
            elapsed = time.perf_counter() - started
            assert response.status_code == 401
            if i >= 2:  # the first rounds warm caches (the dummy hash is made once)
                bucket.append(elapsed)
    median_unknown, median_wrong = statistics.median(unknown), statistics.median(wrong)
    difference = abs(median_unknown - median_wrong) / max(median_unknown, median_wrong)
    print(
        f"\nmedian unknown user {median_unknown * 1000:.1f} ms, wrong password {median_wrong * 1000:.1f} ms, "
        f"difference {difference:.1%}"
    )
    assert median_wrong > 0.05, "bcrypt at cost 12 should take tens of milliseconds"
    assert difference < 0.20
