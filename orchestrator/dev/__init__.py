"""Development tooling: the demo, local worker processes, a private Redis server, the offline API."""
