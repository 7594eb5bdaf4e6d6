"""Unattended runs: cron lines, run records, hooks and logs."""
