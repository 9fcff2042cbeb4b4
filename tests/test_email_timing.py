"""The password-reset request does not tell, by its answer or its time, whether an
account has the address (run by `.ci/run` with `--with timing`): 50 requests for a known
address and 50 for unknown ones, interleaved in random order; the answers are identical
and their medians differ by less than 10%.

On a loaded two-core machine one round can be thrown by a neighbour (SQLite's fsync
times vary most), so up to three rounds are measured and the best must pass: a real
difference in the work (a message sent on the request path, a write skipped for unknown
addresses) shows in every round.
"""

from __future__ import annotations

import random
import statistics
import time

import pytest
from helpers import PASSWORD

ATTEMPTS = 50
WARM_UP = 5
ROUNDS = 3


def one_round(client, round_number: int) -> float:
    known, unknown, answers = [], [], set()
    for i in range(WARM_UP + ATTEMPTS):
        pair = [(known, "victim@example.com"), (unknown, f"ghost{round_number}-{i}@example.com")]
        random.shuffle(pair)
        for bucket, address in pair:
            started = time.perf_counter()
            response = client.post("/auth/password-reset/request", json={"email": address})
            elapsed = time.perf_counter() - started
            answers.add((response.status_code, response.get_data()))
            if i >= WARM_UP:
                bucket.append(elapsed)
    assert answers == {(202, b'{"status":"accepted"}\n')}
    median_known, median_unknown = statistics.median(known), statistics.median(unknown)
    difference = abs(median_known - median_unknown) / max(median_known, median_unknown)
    print(
        f"\nround {round_number}: median known address {median_known * 1000:.2f} ms, "
        f"unknown {median_unknown * 1000:.2f} ms, difference {difference:.1%}"
    )
    return difference


@pytest.mark.timing
@pytest.mark.parametrize("settings", [{"MAIL_RATE_LIMIT": "10000/hour"}])
def test_reset_request_answers_alike_and_in_the_same_time(client):
    body = {"email": "victim@example.com", "username": "victim", "password": PASSWORD}
    assert client.post("/auth/register", json=body).status_code == 201
    differences = []
    for round_number in range(ROUNDS):
        differences.append(one_round(client, round_number))
        if differences[-1] < 0.10:
            break
    assert min(differences) < 0.10, differences
