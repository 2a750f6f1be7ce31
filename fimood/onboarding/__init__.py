"""Onboarding: the demo (`fimood demo`), its bundled data sets, and training a checkpoint from a table
(`fimood train`)."""
