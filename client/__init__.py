"""bpfexec Python client library and the `bpfexec` command line."""
