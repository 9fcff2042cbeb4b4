"""How far the bcrypt ceiling of `make bench` can be reached on this machine at all.

`make bench` sets the login and register rows against cores / (the fastest of ten
bcrypt checks, one at a time). This measures the same check one at a time and then on
every core at once (a process per core, as uWSGI's workers run them), and prints the
throughput of the second as a share of that ceiling: what a login could reach if it did
nothing but bcrypt.

    .venv/bin/python bench/bcrypt_parallel.py [--rounds 12] [--checks 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from multiprocessing import Pool

import bcrypt

PASSWORD = b"correct horse battery staple 9"


def check(hashed: bytes) -> float:
    started = time.perf_counter()
    bcrypt.checkpw(PASSWORD, hashed)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="BCRYPT_ROUNDS (default 12, production's)")
    parser.add_argument("--checks", type=int, default=20, help="checks on all cores at once, per repeat")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(args.rounds))
    for _ in range(args.repeat):
        alone = sorted(check(hashed) for _ in range(10))
        ceiling = cores / alone[0]
        with Pool(cores) as pool:
            started = time.perf_counter()
            pool.map(check, [hashed] * args.checks, chunksize=1)
            throughput = args.checks / (time.perf_counter() - started)
        print(
            f"one at a time: fastest {alone[0] * 1000:.0f} ms, median {statistics.median(alone) * 1000:.0f} ms, "
            f"ceiling {ceiling:.2f}/s on {cores} cores; all cores at once: {throughput:.2f}/s = "
            f"{throughput / ceiling:.2f} of the ceiling"
        )


if __name__ == "__main__":
    main()
