"""A faithful stand-in for Mailgun's suppressions API, for tests and local runs."""

from worker.emulator.app import MailgunEmulator, RecordedRequest
from worker.emulator.faults import Fault
from worker.emulator.settings import EmulatorSettings

__all__ = ["EmulatorSettings", "Fault", "MailgunEmulator", "RecordedRequest"]
