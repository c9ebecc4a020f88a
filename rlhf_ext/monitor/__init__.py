"""Reward-hacking monitor, review queue and page, run report."""
