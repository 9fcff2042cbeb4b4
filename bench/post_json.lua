-- POST the same JSON body (BENCH_BODY, set by bench.py) every time: /auth/login.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = BENCH_BODY
