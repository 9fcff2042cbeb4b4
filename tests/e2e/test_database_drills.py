"""The outage drill on the production stack: nginx and two uWSGI instances (uwsgi.ini:
a process per core, 2 threads each) on a PostgreSQL cluster of the test's own, under
/auth/me traffic through nginx; `pg_ctl restart -m fast`. Every worker's breaker may
trip; each worker's probe closes its own, so the whole stack serves again within about
a second of PostgreSQL's return, not after the breaker's 60 s."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pgcluster
import pytest

from devtools.stack import Api, Outcome, Stack, traffic

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(not pgcluster.available(), reason="needs PostgreSQL's initdb (postgresql-15)"),
]
RECOVERY_BOUND = 2.0


def test_every_worker_serves_again_within_2s_of_a_database_restart(tmp_path):
    with pgcluster.pg_cluster(max_connections=60) as cluster:
        url = cluster.create_database("e2e_drill")
        env = {"BCRYPT_ROUNDS": "4", "CIRCUIT_BREAKER_THRESHOLD": "3", "DATABASE_CONNECT_TIMEOUT": "2"}
        with Stack(tmp_path, url, instances=2, env=env).running() as stack:
            user = Api(stack, stack.https_url).register()
            request = ("GET", "/auth/me", None, {"Authorization": f"Bearer {user['access_token']}"})
            outcomes: list[Outcome] = []

            def load() -> None:
                outcomes.extend(traffic(stack.https_url, [request], threads=6, seconds=10, tls=stack.tls_context()))

            client = threading.Thread(target=load, daemon=True)
            client.start()
            time.sleep(3)
            restarted = time.monotonic()
            cluster.restart("fast")
            back = time.monotonic()
            client.join(timeout=120)
            assert not client.is_alive()
            logs = [entry for number in stack.instance for entry in stack.instance[number].log_entries()]

    kinds = Counter(outcome.status for outcome in outcomes)
    assert all(o.status in (200, 503) for o in outcomes), kinds
    opened = [e for e in logs if e.get("event") == "breaker_transition" and e.get("to_state") == "open"]
    assert opened, "the restart tripped at least one worker's breaker (the drill needs it)"
    late = [o for o in outcomes if o.started >= back + RECOVERY_BOUND]
    assert len(late) >= 50 and all(o.status == 200 for o in late), Counter(o.status for o in late)
    first_ok = min(o.started for o in outcomes if o.started >= back and o.status == 200)
    assert first_ok - back < RECOVERY_BOUND
    failed_after = [o for o in outcomes if o.started >= back and o.status != 200]
    last_failure = max((o.ended for o in failed_after), default=back) - back
    print(
        f"\nrestart {back - restarted:.2f}s; {len(opened)} breakers opened; first 200 {first_ok - back:.2f}s and "
        f"last 503 {last_failure:.2f}s after PostgreSQL was back; {dict(kinds)}"
    )
