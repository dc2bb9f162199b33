"""Builders shared by several test modules (import as ``from helpers.<module> import ...``; a test module never
imports another test module)."""
