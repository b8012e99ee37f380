"""The one exception users see: a clear message that names the problem and the fix."""


class GemmaError(ValueError):
    """Bad input (file, config, prompt, argument). The message is meant to be shown as-is, on one line."""
