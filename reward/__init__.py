"""Rewards: math answer verification and sandboxed code execution; datasets.
Imports nothing of ours outside itself."""
