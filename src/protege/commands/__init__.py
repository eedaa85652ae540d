"""One module per `protege` subcommand; `protege.cli` wires them into one parser."""
