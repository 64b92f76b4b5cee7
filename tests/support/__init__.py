"""Helpers shared by the test tiers: a real supervised node on free ports, and a raw HTTP client."""
