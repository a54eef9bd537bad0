"""The contract every part shares: scenario schema and units, wire format and codecs, manifest, topics, typed messages, seeds."""
