"""ccpd: a local gateway between Anthropic Messages API clients and upstream lanes."""
