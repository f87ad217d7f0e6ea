"""The `dmoe` command line: subcommands dht, peer, status, and the client jobs."""
