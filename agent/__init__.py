"""The Caravan agent process: AutoGen AgentChat over NATS. Imports neither gateway nor control."""
