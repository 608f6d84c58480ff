"""The plugin layer: hook specifications (``hookspecs``), the host that loads plugins (``host``), what they
registered (``registry``), method presets (``presets``) and conformance fixtures for plugin authors (``testing``)."""

from prunekit.plugin.hookspecs import hookimpl

__all__ = ["hookimpl"]
