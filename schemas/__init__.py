"""Tally's event contracts: CloudEvents models, the record codec, topic names, plan catalog."""
