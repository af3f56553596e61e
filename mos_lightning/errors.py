"""Configuration mistakes are reported as such: the CLI prints the message, not a torch trace."""


class ConfigError(ValueError):
    """A setting is outside what is allowed; the message names the setting and the allowed values."""
