"""Output: what a finished run gives people and systems: the nightly export, explanations, reports."""
