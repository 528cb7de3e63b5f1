"""Scheduler service: worker selection with replicated in-flight load (issue #4)."""
