"""The base of every error gptpkg raises on bad input or a failed step.

Each module keeps its own error class (ConfigError, FetchError, ...) derived from this
one, so the CLI reports any of them as a one-line message without importing the
modules that define them (a stage's DVC deps stay the modules it really runs).
"""


class GptpkgError(Exception):
    """Bad input or a failed stage: the message names what was wrong and what was expected."""
