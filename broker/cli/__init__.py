"""The `apm` command line: talks to the broker only through `client`; never imports core."""
