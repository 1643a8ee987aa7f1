"""The Mailgun account the tests use: the emulator's domain and API key."""

from __future__ import annotations

DOMAIN = "mg.example.com"
API_KEY = "key-test-0123456789abcdef"
