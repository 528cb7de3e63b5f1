"""Code shared by the benchmarks (and reused by tests): the stack under test, the load generator's
wire client and drivers, plots, workloads and fakes. Benchmarks import no test modules."""
