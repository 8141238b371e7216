"""Preference optimisation (DPO, IPO, KTO, ORPO) through TRL on Ray Train. `data`: the record formats."""
