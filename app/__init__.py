"""Switchyard: a metered, secured, OpenAI-compatible gateway and the tools around it."""

__version__ = "0.1.0"
