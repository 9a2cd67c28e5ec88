"""`python -m bpfexec`: the `bpfexec` command line (`bpfexec.client.cli`)."""

from bpfexec.client.cli import main

raise SystemExit(main())
