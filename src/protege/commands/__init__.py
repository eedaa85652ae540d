"""One module per `protege` subcommand (`train`, `serve-teacher`, `eval`, `demo`); `protege.cli` wires them into
one parser."""
