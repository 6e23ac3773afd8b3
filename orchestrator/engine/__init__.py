"""The engine: the coordinator's decisions, the attempt lifecycle, control, dispatch and events."""
