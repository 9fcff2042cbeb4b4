"""Development and operations support shared by the tests and the benchmarks: the
PostgreSQL admin connection, a fault-injecting TCP proxy, and the nginx + uWSGI stack of
the production files started on free loopback ports. Nothing here runs in production."""
